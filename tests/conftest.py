"""Shared fixtures: tiny offline models and synthetic data, built once per test session."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# `accelerate launch` for the multi-process tests, through accelerate's own `accelerate-launch` entry
# point: the same parser and launch_command, without the `accelerate` CLI importing every subcommand
# first (its `estimate` imports transformers' model classes: 7.3 s vs 2.7 s to start, measured with
# --help, paid by every launch). tests/test_config.py still runs the literal `accelerate launch`.
ACCELERATE_LAUNCH = [str(Path(sys.executable).parent / "accelerate-launch")]

# hypothesis fails an example that takes over 200 ms by default: a wall-clock assertion that a busy
# machine trips; tests assert behaviour, timings live in bench/
settings.register_profile("r1mm", deadline=None)
settings.load_profile("r1mm")

# An accelerate launch config for 2 processes under a DeepSpeed JSON; the default JSON is ZeRO-3 with
# stage3_param_persistence_threshold 0, so every parameter is partitioned whatever the model's size.
DEEPSPEED_LAUNCH = """
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {json}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
"""


def deepspeed_launch_config(folder: Path, ds_json: Path | None = None, name: str = "zero3_partitioned.yaml") -> Path:
    path = folder / name
    path.write_text(DEEPSPEED_LAUNCH.format(json=ds_json or REPO / "tests" / "configs" / "zero3_partitioned.json"))
    return path


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """R1MM_CACHE/tiny_models of the test session (subprocesses get R1MM_CACHE=tiny_cache.parent)."""
    return tmp_path_factory.mktemp("r1mm_cache") / "tiny_models"


@pytest.fixture(scope="session")
def tiny_path(tiny_cache):
    """tiny_path("qwen2_5_vl", small=False) -> folder of a saved tiny model (built once); ``tools``: a tokenizer
    that writes tool calls (``tiny:<family>:small:tools``)."""
    from r1_mm.models.tiny import TinySpec, tiny_model_path

    def get(family: str = "qwen2_5_vl", small: bool = False, seed: int = 0, tools: bool = False) -> Path:
        spec = TinySpec(family=family, small_vocab=small, seed=seed, tools=tools)
        return tiny_model_path(spec, cache_dir=tiny_cache)

    return get


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    from r1_mm.testing import synthetic

    root = tmp_path_factory.mktemp("synthetic")
    return {
        "counting": synthetic.make_counting_task(root, 8, seed=1),
        "spatial": synthetic.make_spatial_task(root, 6, seed=2),
        "events": synthetic.make_event_video_task(root, 4, seed=3),
        "multi_image": synthetic.make_multi_image_task(root, 4, seed=4),
    }


def rows_with_absolute_media(path: Path) -> list[dict]:
    """A synthetic task's rows with their image / video paths made absolute (rows of several tasks in one file)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        for key in ("image", "video"):
            if key in row:
                row[key] = str(path.parent / row[key])
    return rows


def assert_same_updates(whole: dict, split: dict, start: dict) -> None:
    """Two runs made the same weight updates, as far as AdamW lets float noise show: on parameters whose
    true gradient is ~0, g / sqrt(v) turns summation-order noise into updates of up to the learning
    rate. So: nearly every element (all but 0.1%) within 0.1% of the largest change training made, and
    none off by more than 10% of it. (The gradients themselves are compared through train/grad_norm.)"""
    import torch

    moved = max(float((whole[k] - start[k]).abs().max()) for k in whole)
    assert moved > 1e-3, moved
    diffs = torch.cat([(split[k] - whole[k]).abs().flatten() for k in whole])
    assert float(diffs.max()) < 0.1 * moved, (float(diffs.max()), moved)
    assert float((diffs > 1e-3 * moved).float().mean()) < 1e-3, (float((diffs > 1e-3 * moved).float().mean()), moved)


def stop_process_group(proc) -> None:
    """SIGTERM to a server started with start_new_session=True and everything it started; SIGKILL after 30 s."""
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
