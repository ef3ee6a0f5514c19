import json
import subprocess
import sys
from pathlib import Path

from r1_mm.cli import main

from .conftest import REPO

BIN = Path(sys.executable).parent


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ["train", "rollout", "demo", "make-tiny", "make-data"]:
        assert command in out


def test_console_script_help_and_unknown_command():
    ok = subprocess.run([str(BIN / "r1-mm"), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "usage: r1-mm" in ok.stdout
    bad = subprocess.run([str(BIN / "r1-mm"), "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'train'" in bad.stderr


def test_train_rejects_bad_recipe_with_field_name(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rollout:\n  temprature: 0.7\n")
    assert main(["train", str(recipe)]) == 2
    assert "unknown key 'rollout.temprature'; did you mean 'temperature'" in capsys.readouterr().err


def test_make_tiny_and_make_data(tmp_path):
    assert main(["make-tiny", "qwen2_vl", str(tmp_path / "m"), "--small-vocab"]) == 0
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "processor_config.json").exists()
    assert main(["make-data", "events", str(tmp_path / "d"), "--rows", "2"]) == 0
    assert len((tmp_path / "d" / "events.jsonl").read_text().splitlines()) == 2


def test_demo_rollout_recipe_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--rows", "8", "--recipe", str(REPO / "recipes" / "demo_rollout.yaml"),
                 "training.max_steps=2", "logging.progress_bar=false"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert metrics[-1]["data/rows_prepared"] == 4
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 2 * 2 * 4  # steps x prompts x G
    assert (out / "recipe.resolved.yaml").exists()


def test_demo_grpo_runs_and_plots(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--rows", "16", "training.max_steps=3", "training.save_steps=null",
                 "logging.progress_bar=false"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert {"rewards/numeric/mean", "rewards/format/mean", "train/kl", "train/loss"} <= set(metrics[0])
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "checkpoints" / "step-000003" / "model" / "config.json").exists()


def test_demo_rerun_starts_fresh_metrics(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--rows", "4", "--recipe", str(REPO / "recipes" / "demo_rollout.yaml"),
            "training.max_steps=1", "logging.progress_bar=false"]
    assert main(args) == 0 and main(args) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_sweep_prints_and_runs_every_combination(tmp_path, synthetic_data, capsys, tiny_cache, monkeypatch):
    recipe = str(REPO / "recipes" / "demo_counting_grpo.yaml")
    assert main(["sweep", recipe, "--grid", "algorithm.grpo.beta=0,0.04", "--grid", "rollout.num_generations=4,8",
                 "--seeds", "1,2", "--print", "--out", str(tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8
    assert any("logging.run_name=beta=0.04,num_generations=8,seed=2" in line for line in lines)
    assert all("logging.group=demo_counting_grpo" in line for line in lines)
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    assert main(["sweep", recipe, "--grid", "algorithm.grpo.beta=0,0.04", "--seeds", "0", "--out", str(tmp_path / "run"),
                 f"data.train_path={synthetic_data['counting']}", "training.max_steps=1", "training.save_steps=null",
                 "logging.progress_bar=false", "rollout.num_generations=2"]) == 0
    for name in ("beta=0,seed=0", "beta=0.04,seed=0"):
        resolved = (tmp_path / "run" / name / "recipe.resolved.yaml").read_text()
        assert f"run_name: {name}" in resolved and "group: demo_counting_grpo" in resolved
        assert (tmp_path / "run" / name / "metrics.jsonl").exists()


def test_demo_sft_cold_start_then_grpo_from_its_checkpoint(tmp_path):
    """`r1-mm demo --sft-steps N`: SFT on the counting rows' answers, then GRPO starting from the SFT run's folder
    (its last checkpoint's model, recorded in the GRPO run's resolved recipe and run_info)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--rows", "16", "--sft-steps", "2", "training.max_steps=2",
                 "training.save_steps=null", "logging.progress_bar=false"]) == 0
    sft = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in sft] == [0, 1] and all(m["train/loss"] > 0 for m in sft)
    grpo = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in grpo] == [0, 1]
    info = json.loads((out / "grpo" / "run_info.json").read_text())
    assert str(out / "sft" / "checkpoints" / "step-000002" / "model") in json.dumps(info)
