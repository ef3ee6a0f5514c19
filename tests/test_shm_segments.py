"""Shared-memory weight folders do not outlive their owner: one left by a SIGKILLed process is removed
by the next start, one whose owner lives is not touched, and an owner that exits removes its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from r1_mm.config.recipe import load_recipe
from r1_mm.rollout.shm_segments import PREFIX, default_root
from r1_mm.trainers.grpo import GRPOTrainer

from .conftest import REPO
from .test_run_folder import BIN, overrides, serving_processes

# a process holding a segment as VLLMPoolEngine does (WeightSegment), with a weight file in it
HOLDER = """
import signal, time
# Ctrl-C raises KeyboardInterrupt even when this test runs in a background job (non-interactive shells
# start those with SIGINT ignored, and Python keeps an inherited ignore)
signal.signal(signal.SIGINT, signal.default_int_handler)
from r1_mm.rollout.shm_segments import WeightSegment
segment = WeightSegment()
(segment.path / "v1").mkdir()
(segment.path / "v1" / "part-00000.safetensors").write_bytes(b"w" * (1 << 20))
print(segment.path, flush=True)
time.sleep(600)
"""


def hold_segment() -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    path = Path(proc.stdout.readline().strip())
    assert path.is_dir() and path.name.startswith(f"{PREFIX}{proc.pid}-"), path
    return proc, path


def test_a_new_start_removes_only_segments_whose_owner_is_gone(tmp_path, synthetic_data, tiny_cache, monkeypatch,
                                                              caplog):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    assert default_root() == Path("/dev/shm")
    killed, stale = hold_segment()
    alive, live = hold_segment()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert not psutil.pid_exists(killed.pid) and stale.is_dir()  # the premise: its owner could not clean up
        with caplog.at_level("WARNING"):
            trainer = GRPOTrainer(load_recipe(None, [
                "model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={synthetic_data['counting']}",
                f"training.output_dir={tmp_path / 'run'}", "media.max_pixels=3136", "rollout.num_generations=2",
                "rollout.max_completion_length=2", "training.prompts_per_step=1", "training.max_steps=1",
                "logging.progress_bar=false", "rewards.functions=[{name: numeric}]"]))
        assert not stale.exists()
        assert live.is_dir() and (live / "v1" / "part-00000.safetensors").exists()  # its owner lives
        said = [r.message for r in caplog.records if str(stale) in r.message]
        assert len(said) == 1 and f"process {killed.pid}" in said[0] and "1.0 MiB" in said[0]
        trainer.close()
    finally:
        alive.send_signal(signal.SIGINT)  # KeyboardInterrupt: the owner exits normally ...
        alive.wait(30)
        killed.kill()
    assert not live.exists()  # ... and removes its own segment on the way out


@pytest.mark.slow
def test_a_sigkilled_vllm_pool_learner_leaves_no_weights_after_the_next_start(tmp_path, synthetic_data, tiny_cache,
                                                                              monkeypatch):
    """The real case: `r1-mm train` on vllm_pool (weights in /dev/shm after every step), SIGKILLed."""
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))
    out, data = tmp_path / "run", synthetic_data["counting"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    shm = default_root()
    before = set(shm.glob(f"{PREFIX}*"))
    servers_before = serving_processes()
    cmd = [str(BIN / "r1-mm"), "train", str(recipe), *overrides(
        out, data, "training.max_steps=500", "training.save_steps=null", "rollout.engine=vllm_pool",
        "rollout.pool_size=1", "rollout.vllm_max_model_len=1024", "data.max_prompt_length=512")]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 900
    while time.time() < deadline and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    left = set(shm.glob(f"{PREFIX}{proc.pid}-*")) - before
    assert left and all(any(p.glob("v*/*.safetensors")) for p in left)  # the premise: weights sat there
    proc.kill()  # the learner alone, as the OOM killer does; its servers die with it (parent-death signal)
    proc.communicate(timeout=60)
    assert all(p.is_dir() for p in left)  # the premise: nothing could remove them
    GRPOTrainer(load_recipe(None, overrides(tmp_path / "next", data)))  # the next start, any engine
    assert not any(p.exists() for p in left)
    deadline = time.time() + 60
    while serving_processes() - servers_before and time.time() < deadline:
        time.sleep(0.5)
    assert serving_processes() <= servers_before
