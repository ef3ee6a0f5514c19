"""Issue 19, point 13: the command line says what it does and fails in one line. `r1-mm plan` on a hub
id with no hub, overrides after options, the commands' --help, `rewards check`'s column mapping and
kwargs check, plugin metric names (of a training step: tests/test_grpo_loop.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1_mm.cli import main
from r1_mm.config.recipe import RewardSpec
from r1_mm.models.tiny import FAMILY_NAMES
from r1_mm.rewards.runner import RewardRunner

BIN = Path(sys.executable).parent


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(("hub_env", "expected"), [
    ({"HF_HUB_OFFLINE": "1"}, "it is not in the local cache and HF_HUB_OFFLINE=1"),
    # online, but nothing listens there: the connection is refused at once, so a wait could only be retries
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "it is not in the local cache and http://127.0.0.1:9 cannot be reached ([Errno 111] Connection refused)"),
])
def test_plan_on_an_unreachable_hub_id_is_one_line(tmp_path, hub_env, expected):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name_or_path: r1mm-tests/no-such-model}\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **hub_env}  # an empty cache
    proc = subprocess.run([str(BIN / "r1-mm"), "plan", str(recipe), "model.dtype=bfloat16", "--gpus", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    line = one_error_line(proc)
    assert line == (f"error: model.name_or_path 'r1mm-tests/no-such-model' cannot be reached: {expected}; download it "
                    "(hf download) or give a local model folder")
    assert "Retrying in" not in proc.stderr  # huggingface_hub's backoff (5 retries, ~25 s) never started


def test_overrides_may_follow_options(tmp_path, capsys, tiny_cache, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("training: {seed: 1}\n")
    assert main(["train", str(recipe), "--print-config", "training.seed=7", "rollout.top_k=5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and "top_k: 5" in out
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    assert main(["plan", str(recipe), "--gpus", "2", "model.name_or_path=tiny:qwen2_5_vl:small", "--json",
                 "rollout.num_generations=3"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpus"] == 2 and "G=3" in json.dumps(plan["lines"])


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["rollout", "--help"])
    rollout = capsys.readouterr().out
    assert "usage: r1-mm rollout" in rollout and "Sample completions" in rollout and "Train a policy" not in rollout
    with pytest.raises(SystemExit):
        main(["make-tiny", "--help"])
    make_tiny = capsys.readouterr().out
    main(["--help"])
    top = capsys.readouterr().out
    assert "make-tiny" in top
    for name in FAMILY_NAMES.values():  # the families come from models/families, not a hand-kept list
        assert name in make_tiny
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--lmms-eval TASKS" in capsys.readouterr().out


def rewards_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "r1-mm"), "rewards", "check", *args], capture_output=True, text=True, timeout=300)


def test_rewards_check_maps_columns(tmp_path, synthetic_data):
    rows = [json.loads(line) for line in synthetic_data["counting"].read_text().splitlines()]
    data = tmp_path / "renamed.jsonl"  # a public dataset's column name, as data.columns maps it in a recipe
    data.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "solution"},
                                        "ground_truth": r["solution"]}) + "\n" for r in rows))
    ok = rewards_check("numeric", "--data", str(data), "--rows", "2", "--columns", '{"ground_truth": "solution"}')
    assert ok.returncode == 0, ok.stderr
    assert "completion=solution  reward=1.000" in ok.stdout


def test_rewards_check_finds_misspelt_kwargs(synthetic_data):
    misspelt = rewards_check("numeric", "--data", str(synthetic_data["counting"]), "--kwargs", '{"require_tags": true}')
    assert misspelt.returncode == 1
    assert ("problem: reward 'numeric'.kwargs.require_tags is not an option of this reward; did you mean "
            "'require_tag'?") in misspelt.stderr
    assert "kwargs.tagg is not an option" in rewards_check(
        "by_problem_type", "--data", str(synthetic_data["counting"]),
        "--kwargs", '{"reward_kwargs": {"numeric": {"tagg": "x"}}}').stderr
    bad_json = rewards_check("numeric", "--data", str(synthetic_data["counting"]), "--kwargs", "{tag: x}")
    assert one_error_line(bad_json).startswith("error: --kwargs is not valid JSON (")


def test_plugin_reward_counters_carry_the_function_name(tmp_path):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text("def counted(completions, **kwargs):\n    return [1.0 for _ in completions]\n"
                      "counted.metrics = lambda: {'calls': 3}\n")
    metrics = RewardRunner([RewardSpec(name=f"{plugin}:counted")]).metrics()
    # (math-verify's process-wide counters may sit beside it when other tests checked answers first)
    assert {k: v for k, v in metrics.items() if not k.startswith("rewards/math_verify/")} == \
        {"rewards/counted/calls": 3.0}
