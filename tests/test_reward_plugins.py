"""Reward plugins: the decorator, file and dotted paths, the installed example package (entry point),
async rewards, the metrics hook and `r1-mm rewards list|check`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from r1_mm.config.recipe import RewardSpec, load_recipe
from r1_mm.rewards import available, get, reward
from r1_mm.rewards.runner import RewardRunner
from r1_mm.run.tracking import read_metrics
from r1_mm.trainers.grpo import GRPOTrainer

from .conftest import REPO

BIN = Path(sys.executable).parent
PLUGINS = REPO / "tests" / "plugins"


def run(runner: RewardRunner, completions: list[str], rows: list[dict]):
    return runner(prompts=[""] * len(completions), completions=completions, completion_ids=[[1]] * len(completions),
                  rows=rows, row_ids=[str(i) for i in range(len(rows))])


def test_decorator_file_and_dotted_paths():
    @reward("shout")
    def shout(completions, **kwargs):
        return [float(c.isupper()) for c in completions]

    assert get("shout") is shout and available()["shout"].endswith("shout")
    assert get(f"{PLUGINS}/faulty.py:alternating")(completions=["a", "b"]) == [0.0, 1.0]
    assert get("tests.plugins.faulty:alternating")(completions=["a", "b"]) == [0.0, 1.0]
    with pytest.raises(Exception, match="has no function 'nope'"):
        get(f"{PLUGINS}/faulty.py:nope")


def test_example_package_registers_through_entry_point():
    source = available()["answer_length"]
    assert source.startswith("entry point r1mm_reward_example.rewards:answer_length (r1mm-reward-example)")
    batch = run(RewardRunner([RewardSpec(name="answer_length", kwargs={"target_chars": 1})]),
                ["<answer>7</answer>", "<answer>77</answer>", "x"],
                [{"problem_type": "counting"}, {"problem_type": "counting"}, {"problem_type": "free_form"}])
    assert batch.per_function[:2, 0].tolist() == [1.0, 0.0] and batch.total[2].isnan()


def test_async_reward_runs_sync_and_inside_a_running_loop():
    runner = RewardRunner([RewardSpec(name="async_answer_length")])
    rows = [{}, {}]
    assert run(runner, ["<answer>7</answer>", "<answer>777</answer>"], rows).total.tolist() == [1.0, 0.0]

    async def inside_loop():
        return run(runner, ["<answer>7</answer>", "<answer>777</answer>"], rows).total.tolist()

    assert asyncio.run(inside_loop()) == [1.0, 0.0]


def test_context_only_reaches_rewards_that_accept_it():
    def strict(completions, prompts, completion_ids):  # no **kwargs, no max_completion_length
        return [1.0 for _ in completions]

    reward("strict_sig")(strict)
    runner = RewardRunner([RewardSpec(name="strict_sig"), RewardSpec(name="overlong", kwargs={"buffer": 1})],
                          context={"max_completion_length": 2})
    batch = runner(prompts=[""] * 2, completions=["a", "b"], completion_ids=[[1], [1, 2]], rows=[{}, {}],
                   row_ids=["0", "1"])
    assert batch.per_function.tolist() == [[1.0, 0.0], [1.0, -1.0]]  # 2 tokens = the limit: DAPO gives -1


def test_example_plugin_reward_in_a_training_step(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    cfg = load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={synthetic_data['counting']}",
        f"training.output_dir={tmp_path / 'run'}", "data.format_instruction=null", "media.max_pixels=3136",
        "rollout.num_generations=4", "rollout.max_completion_length=3", "training.max_steps=1",
        "logging.progress_bar=false", "rewards.functions=[{name: answer_length, kwargs: {target_chars: 2}}]"])
    GRPOTrainer(cfg).train()
    metrics = read_metrics(cfg.training.output_dir)[0]
    assert 0.0 <= metrics["rewards/answer_length/mean"] <= 1.0 and metrics["rewards/answer_length/applicable"] == 1.0


def test_cli_rewards_list_and_check(tmp_path, synthetic_data):
    listed = subprocess.run([str(BIN / "r1-mm"), "rewards", "list"], capture_output=True, text=True, check=True).stdout
    assert "mra" in listed and "answer_length" in listed and "entry point" in listed
    data = str(synthetic_data["counting"])
    ok = subprocess.run([str(BIN / "r1-mm"), "rewards", "check", "numeric", "--data", data, "--rows", "2",
                         "--kwargs", '{"require_tag": true}'], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "completion=solution  reward=1.000" in ok.stdout and "completion=empty     reward=0.000" in ok.stdout
    bad = tmp_path / "bad.py"
    bad.write_text("def positional(completions, threshold):\n    return [1.0]\n"
                   "def short(completions, **kw):\n    return [1.0]\n")
    out = subprocess.run([str(BIN / "r1-mm"), "rewards", "check", f"{bad}:positional", "--data", data],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "it needs argument 'threshold', which is neither a reward argument" in out.stderr
    assert "it has no **kwargs, but it is also called with" in out.stderr
    out = subprocess.run([str(BIN / "r1-mm"), "rewards", "check", f"{bad}:short", "--data", data],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "returned 1 values for 8 completions" in out.stderr
    out = subprocess.run([str(BIN / "r1-mm"), "rewards", "check", "acuracy", "--data", data],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "did you mean 'accuracy'" in out.stderr
