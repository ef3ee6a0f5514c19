"""Trackers are accelerate's (W&B offline, TensorBoard) or a plugin, they get the recipe and every
step's metrics, and a resumed run continues the same tracker run. What the trackers received is read
through a recording plugin and the trackers' own readers, not by parsing their file formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from r1_mm.config.recipe import load_recipe
from r1_mm.run.checkpoint import CheckpointManager
from r1_mm.trainers.grpo import GRPOTrainer

from .conftest import REPO

RECORDER = f"{REPO}/tests/plugins/recording_tracker.py:RecordingTracker"


@pytest.fixture(autouse=True)
def _env(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    monkeypatch.setenv("WANDB_MODE", "offline")


def recipe(tmp_path: Path, data: Path, *overrides: str):
    return load_recipe(None, [
        "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={tmp_path / 'run'}",
        "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136", "media.max_frames=4",
        "rollout.num_generations=4", "rollout.max_completion_length=3", "training.prompts_per_step=2",
        "training.max_steps=2", "training.learning_rate=1e-3", "logging.progress_bar=false",
        "logging.run_name=t", "rewards.functions=[{name: format}, {name: mra}]", *overrides])


def recorded(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trackers" / "recording.jsonl").read_text().splitlines()]


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_and_a_plugin_get_the_recipe_metrics_and_tables(tmp_path, synthetic_data):
    cfg = recipe(tmp_path, synthetic_data["events"], f"logging.report_to=[wandb, '{RECORDER}']",
                 "logging.table_steps=1", f"logging.tracker_kwargs={{'{RECORDER}': {{tag: x}}}}")
    trainer = GRPOTrainer(cfg)
    trainer.train()
    run_dir = Path(cfg.training.output_dir)
    events = recorded(run_dir)
    assert events[0] == {"event": "init", "project": "r1-mm", "run_id": trainer.run_id, "resumed": False, "tag": "x"}
    config = next(e["values"] for e in events if e["event"] == "config")
    assert config["algorithm.grpo.beta"] == cfg.algorithm.grpo.beta and config["rollout.num_generations"] == 4
    logs = [e for e in events if e["event"] == "log"]
    assert [e["step"] for e in logs] == [0, 1] and events[-1]["event"] == "finish"
    assert {"rewards/format/mean", "rewards/mra/mean", "train/kl", "train/entropy", "train/clip_ratio_low",
            "completions/mean_length", "completions/truncated_ratio", "rewards/frac_zero_std_groups",
            "throughput/completion_tokens_per_s"} <= set(logs[0]["values"])
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logs[1]["values"]["rewards/mra/mean"] == jsonl[1]["rewards/mra/mean"]  # the trackers mirror the file
    # W&B (offline, really started): one run named by the r1-mm run id, with the completion tables it wrote
    (run,) = wandb_runs(run_dir)
    assert run.name.endswith(f"-{trainer.run_id}") and (run / f"run-{trainer.run_id}.wandb").stat().st_size > 0
    tables = sorted((run / "files" / "media" / "table").glob("completions_*.table.json"))
    assert len(tables) == 2  # steps 0 and 1
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "row_id", "media"] and len(table["data"]) == 4
    assert all(row[2] == "Image" for row in table["data"])  # the frames strip of the video prompt (an artifact)


def test_a_resumed_run_continues_its_tracker_runs(tmp_path, synthetic_data):
    first = recipe(tmp_path, synthetic_data["counting"], f"logging.report_to=[wandb, '{RECORDER}']",
                   "training.save_steps=1", "training.max_steps=2")
    trainer = GRPOTrainer(first)
    trainer.train()
    run_dir = Path(first.training.output_dir)
    assert CheckpointManager(run_dir).latest_intact()[0] is not None
    again = recipe(tmp_path, synthetic_data["counting"], f"logging.report_to=[wandb, '{RECORDER}']",
                   "training.save_steps=1", "training.max_steps=3", "training.resume_from=latest")
    resumed = GRPOTrainer(again)
    resumed.train()
    assert resumed.run_id == trainer.run_id
    inits = [e for e in recorded(run_dir) if e["event"] == "init"]
    assert [(e["run_id"], e["resumed"]) for e in inits] == [(trainer.run_id, False), (trainer.run_id, True)]
    assert sum(e["event"] == "config" for e in recorded(run_dir)) == 1  # the configuration is stored once
    steps = [e["step"] for e in recorded(run_dir) if e["event"] == "log"]
    assert steps == [0, 1, 2]
    # W&B: the second launch reopened the same run id (wandb names each launch's folder after the run)
    runs = wandb_runs(run_dir)
    # offline-run-<time>-<id>; wandb adds -1 when two launches start within the same second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{trainer.run_id}(-\d+)?", r.name)
                                  for r in runs), [r.name for r in runs]


def test_tensorboard_events_read_back_by_tensorboard(tmp_path, synthetic_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = recipe(tmp_path, synthetic_data["counting"], "logging.report_to=[tensorboard]",
                 "logging.tracker_kwargs={tensorboard: {flush_secs: 1}}")
    GRPOTrainer(cfg).train()
    logdir = Path(cfg.training.output_dir) / "tensorboard"
    (folder,) = [p for p in logdir.rglob("*") if p.is_dir() and any(p.glob("events.out.tfevents.*"))
                 and p.parent == logdir]
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "rewards/format/mean" in scalars and "train/loss" in scalars
    assert [e.step for e in events.Scalars("rewards/format/mean")] == [0, 1]
