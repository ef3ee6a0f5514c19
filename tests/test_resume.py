"""Exact resume: a run killed with SIGKILL mid-training and resumed logs the same metrics, on the same
data, as a run that was never interrupted (CPU, fixed seeds), in one process and under DeepSpeed
ZeRO-3 on 2 processes. Slow: three real training runs per case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ACCELERATE_LAUNCH, deepspeed_launch_config

BIN = Path(sys.executable).parent
PLUGIN = Path(__file__).parent / "plugins" / "faulty.py"
COMPARED = ("rewards/total", "train/loss", "train/kl", "train/entropy", "completions/mean_length", "data/rows_prepared")


def command(recipe: Path, data: Path, out: Path, extra: list[str], launcher: Path | None = None) -> list[str]:
    start = [str(BIN / "r1-mm"), "train"] if launcher is None else \
        [*ACCELERATE_LAUNCH, "--config_file", str(launcher), "-m", "r1_mm.train"]
    return [*start, str(recipe), f"data.train_path={data}", f"training.output_dir={out}", *extra]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process under it at once (a machine failure). torchrun's workers sit in
    sessions of their own: killing the launcher's process group alone leaves them training."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.wait(30)


def read(out: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # a list, not a set: a step logged twice (before the kill and again after the resume) must show
    rows = sorted((c["step"], c["row_id"]) for c in map(json.loads, (out / "completions.jsonl").read_text().splitlines()))
    return metrics, rows


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "backend"), [(["algorithm.grpo.ref_sync_steps=3"], "single"),
                                                (["algorithm.grpo.ref_sync_steps=3"], "zero3")],
                         ids=["synced_reference", "zero3_synced_reference"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, synthetic_data, tiny_cache, extra, backend):
    """With ref_sync_steps the reference moves (synced after step 3), so checkpoints must carry it. Under
    ZeRO-3 the policy, its optimizer states and the reference are partitioned over the 2 processes.
    (A fixed reference is the simpler case of the same path: nothing of it is saved, it is reloaded from
    the model; tests/test_run_folder.py resumes such runs after SIGINT/SIGTERM. Its own variant here was
    dropped for suite time: 38 s.)"""
    launcher = None
    if backend == "zero3":
        launcher = deepspeed_launch_config(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{name_or_path: "tiny:qwen2_5_vl:small"}}
data: {{format_instruction: null}}
media: {{max_pixels: 3136, min_pixels: 3136}}
rollout: {{num_generations: 4, max_completion_length: 3}}
rewards: {{functions: [{{name: "{PLUGIN}:alternating"}}, {{name: numeric, kwargs: {{require_tag: false}}}}]}}
algorithm: {{grpo: {{beta: 0.04}}}}
training: {{max_steps: 8, prompts_per_step: 2, learning_rate: 1.0e-3, save_steps: 2, save_total_limit: 2,
           resume_from: latest}}
logging: {{progress_bar: false}}
""")
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}
    data = synthetic_data["counting"]  # 8 rows: the 8 steps x 2 prompts cross an epoch boundary
    full = tmp_path / "full"
    subprocess.run(command(recipe, data, full, extra, launcher), env=env, check=True, capture_output=True, timeout=600)
    info = json.loads((full / "run_info.json").read_text())
    if backend == "zero3":  # the premise: sharded DeepSpeed, not DDP
        assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", 3, 2)
        assert 0 < info["partitioned_parameters"] and info["local_parameter_elements"] < info["full_parameter_elements"]
    else:
        assert (info["distributed_type"], info["num_processes"]) == ("NO", 1)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(command(recipe, data, crashed, extra, launcher), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics_file = crashed / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once step 4 is logged: checkpoint step-000004 exists, step 5 may be running
        if metrics_file.exists() and '"step": 4,' in metrics_file.read_text():
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_tree(proc)
    assert not (crashed / "checkpoints" / "step-000008").exists()
    checkpoints = sorted(p.name for p in (crashed / "checkpoints").glob("step-*"))
    assert checkpoints[-1] in ("step-000004", "step-000006")

    resumed = subprocess.run(command(recipe, data, crashed, extra, launcher), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {crashed / 'checkpoints' / checkpoints[-1]}" in resumed.stderr

    (a, rows_a), (b, rows_b) = read(full), read(crashed)
    assert [m["step"] for m in b] == list(range(8))  # no step lost, none logged twice
    for ma, mb in zip(a, b, strict=True):
        for key in COMPARED:
            assert mb[key] == pytest.approx(ma[key], abs=1e-5), (ma["step"], key)
    assert rows_b == rows_a  # same prompts at every step: no data repeated or skipped
    assert len(rows_a) == 8 * 2 * 4 * info["num_processes"]  # completions.jsonl: every group of every process


def test_iterative_dpo_resumed_mid_round_trains_the_saved_pairs(tmp_path, synthetic_data, tiny_cache, monkeypatch):
    """A checkpoint taken mid-round carries the round's remaining pairs: the resumed run trains on the
    same pairs with the same weights as the run that never stopped (same losses), instead of sampling
    a new round (which would change the pairs, and the round counter)."""
    from r1_mm.config.recipe import load_recipe
    from r1_mm.trainers.iterative_dpo import IterativeDPOTrainer

    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))

    def run(out: Path, *extra: str) -> list[dict]:
        cfg = load_recipe(None, [
            "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={synthetic_data['counting']}",
            f"training.output_dir={out}", "media.max_pixels=3136", "algorithm.name=iterative_dpo",
            "algorithm.iterative_dpo.round_prompts=4", "rollout.num_generations=4", "rollout.max_completion_length=6",
            "training.prompts_per_step=1", "training.max_steps=4", "training.save_steps=2",
            "training.learning_rate=1.0e-3", "logging.progress_bar=false",
            f"rewards.functions=[{{name: '{PLUGIN}:alternating'}}]", *extra])
        IterativeDPOTrainer(cfg).train()
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    assert [m["iterative/round"] for m in full] == [1.0] * 4  # one round of 4 pairs covers all 4 steps
    resumed = run(tmp_path / "resumed", f"training.resume_from={tmp_path / 'full' / 'checkpoints' / 'step-000002'}")
    tail = [m for m in resumed if m["step"] >= 2]  # metrics count steps from 0: steps 2 and 3 come after the save
    assert [m["step"] for m in tail] == [2, 3]
    for a, b in zip(full[2:], tail, strict=True):
        assert a["iterative/round"] == b["iterative/round"] == 1.0
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-7)
