"""Run folders cannot lose work: a fresh run never writes over another, one run at a time, retention
deletes only the run's own checkpoints, a damaged checkpoint is passed over, and SIGTERM / SIGINT
leave a checkpoint and a resume hint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1_mm.checkpoint import CheckpointManager
from r1_mm.config import ConfigError, load_recipe
from r1_mm.run_folder import RunLock
from r1_mm.trainers.grpo import GRPOTrainer

from .conftest import REPO, deepspeed_launch_config

BIN = Path(sys.executable).parent
PLUGIN = REPO / "tests" / "plugins" / "test_rewards.py"


def overrides(out: Path, data: Path, *extra: str) -> list[str]:
    return ["model.name_or_path=tiny:qwen2_5_vl:small", f"data.train_path={data}", f"training.output_dir={out}",
            "data.format_instruction=null", "media.max_pixels=3136", "media.min_pixels=3136",
            "rollout.num_generations=2", "rollout.max_completion_length=2", "training.prompts_per_step=1",
            "training.max_steps=4", "training.save_steps=2", "logging.progress_bar=false",
            f"rewards.functions=[{{name: '{PLUGIN}:length_reward'}}]", *extra]


@pytest.fixture(autouse=True)
def _cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("R1MM_CACHE", str(tiny_cache.parent))


def train(out: Path, data: Path, *extra: str) -> Path:
    return GRPOTrainer(load_recipe(None, overrides(out, data, *extra))).train()


def test_a_fresh_run_refuses_a_finished_runs_folder(tmp_path, synthetic_data):
    out, data = tmp_path / "run", synthetic_data["counting"]
    train(out, data)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="already holds a run .*training.resume_from=latest.*overwrite_output_dir=true"):
        train(out, data)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing was touched
    with pytest.raises(ConfigError, match="no checkpoint to resume"):  # latest, but the checkpoints were removed
        shutil.rmtree(out / "checkpoints")
        train(out, data, "training.resume_from=latest")
    train(out, data, "training.overwrite_output_dir=true")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_one_run_per_folder(tmp_path, synthetic_data):
    out = tmp_path / "run"
    lock = RunLock(out)  # another run holds the folder
    try:
        with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {os.getpid()}\)"):
            train(out, synthetic_data["counting"])
    finally:
        lock.release()
    train(out, synthetic_data["counting"])  # free again


def test_retention_deletes_only_this_runs_checkpoints(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for step, run_id in ((2, "mine"), (4, "mine"), (6, "mine"), (50, "other")):
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    deleted = CheckpointManager(tmp_path / "run", keep=2, run_id="mine").prune()
    assert [p.name for p in deleted] == ["step-000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000006", "step-000050"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, synthetic_data, caplog):
    out, data = tmp_path / "run", synthetic_data["counting"]
    train(out, data, "training.max_steps=4", "training.save_total_limit=3")
    latest = out / "checkpoints" / "step-000004"
    victim = next(p for p in sorted(latest.rglob("*.safetensors")))
    victim.write_bytes(victim.read_bytes()[:100])  # a checkpoint cut short (disk full, killed copy)
    with caplog.at_level("WARNING"):
        trainer = GRPOTrainer(load_recipe(None, overrides(out, data, "training.resume_from=latest", "training.max_steps=5")))
    assert trainer.resume_path == out / "checkpoints" / "step-000002"
    assert any("step-000004" in r.message and "damaged" in r.message for r in caplog.records)
    trainer.train()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # steps 2 and 3 redone once, not logged twice


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, synthetic_data, tiny_cache, sig):
    out, data = tmp_path / "run", synthetic_data["counting"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    cmd = [str(BIN / "r1-mm"), "train", str(recipe), *overrides(out, data, "training.max_steps=500",
                                                                  "training.save_steps=null")]
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 2,' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    hint = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(hint) == 1 and "resume with training.resume_from=latest" in hint[0] and sig.name in hint[0]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(saved) == 1
    stopped_at = int(saved[0].split("-")[1])
    assert stopped_at >= 3
    resumed = subprocess.run([*cmd[:-2], "training.max_steps=" + str(stopped_at + 2), "training.resume_from=latest"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(stopped_at + 2))


@pytest.mark.slow
def test_ctrl_c_under_zero3_saves_once_and_ends_without_a_traceback(tmp_path, synthetic_data, tiny_cache):
    """A terminal's Ctrl-C (SIGINT to the launcher's process group) on 2 ZeRO-3 processes under `r1-mm launch`:
    one checkpoint, one warning and one resume line for the run (on main every rank printed both) and exit
    130, without the SignalException traceback that torch's elastic launcher ends a plain
    `accelerate launch` with (exit 1)."""
    from r1_mm.checkpoint import damage
    from r1_mm.serving import free_port

    out, data = tmp_path / "run", synthetic_data["counting"]
    launch = deepspeed_launch_config(tmp_path)
    launch.write_text(launch.read_text() + f"main_process_port: {free_port()}\n")  # not 29500, which another run may hold
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    cmd = [str(BIN / "r1-mm"), "launch", str(launch), str(recipe),
           *overrides(out, data, "training.max_steps=500", "training.save_steps=null", "training.prompts_per_step=2")]
    log = tmp_path / "launch.log"  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen(cmd, env={**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(600)
    text = log.read_text()
    info = json.loads((out / "run_info.json").read_text())
    assert (info["distributed_type"], info["zero_stage"], info["num_processes"]) == ("DEEPSPEED", 3, 2)
    assert "Received 2 death signal" in text  # the premise: the elastic agent got the signal and forwarded it
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "SignalException" not in text, text[-3000:]
    lines = text.splitlines()
    assert len([line for line in lines if "SIGINT received: finishing step" in line]) == 1, text[-3000:]
    hint = [line for line in lines if line.startswith("interrupted:")]
    assert len(hint) == 1 and "resume with training.resume_from=latest" in hint[0], text[-3000:]
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and str(saved[0]) in hint[0] and damage(saved[0]) is None


def serving_processes() -> set[int]:
    import psutil

    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if "serve" in line and "rollout" in line and "r1-mm" in line:
            found.add(p.info["pid"])
    return found


@pytest.mark.slow
def test_sigterm_under_vllm_pool_stops_servers_and_frees_shared_memory(tmp_path, synthetic_data, tiny_cache):
    out, data = tmp_path / "run", synthetic_data["counting"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    shm = Path("/dev/shm")
    weights_before = {p.name for p in shm.glob("r1mm-weights-*")}
    servers_before = serving_processes()
    cmd = [str(BIN / "r1-mm"), "train", str(recipe), *overrides(out, data, "training.max_steps=500", "training.save_steps=null",
                                                                  "rollout.engine=vllm_pool", "rollout.pool_size=1",
                                                                  "rollout.vllm_max_model_len=1024", "data.max_prompt_length=512")]
    proc = subprocess.Popen(cmd, env={**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    assert {p.name for p in shm.glob("r1mm-weights-*")} - weights_before  # the premise: weights sat in shared memory
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert {p.name for p in shm.glob("r1mm-weights-*")} == weights_before
    time.sleep(2)
    assert serving_processes() <= servers_before
    assert len(list((out / "checkpoints").iterdir())) == 1
