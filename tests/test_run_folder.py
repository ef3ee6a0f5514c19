"""Run folders cannot lose work: a fresh run never writes over another, one run at a time, retention
deletes only the run's own checkpoints, a damaged checkpoint is passed over, and SIGTERM / SIGINT
leave a checkpoint and a resume hint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1_mm.config.recipe import ConfigError, load_recipe
from r1_mm.run.checkpoint import CheckpointManager, damage, write_manifest
from r1_mm.run.folder import RunLock
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


def flip_a_byte(path: Path) -> None:
    """Damage that keeps the size (a bad sector, a bit flip in transit): one byte mid-file inverted."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["cut_short", "byte_flipped"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, synthetic_data, caplog, damage):
    out, data = tmp_path / "run", synthetic_data["counting"]
    train(out, data, "training.max_steps=4", "training.save_total_limit=3")
    latest = out / "checkpoints" / "step-000004"
    victim = latest / "model" / "model.safetensors"
    size = victim.stat().st_size
    if damage == "cut_short":
        victim.write_bytes(victim.read_bytes()[:100])  # a checkpoint cut short (disk full, killed copy)
    else:
        flip_a_byte(victim)  # in the tensors' bytes: it would still load, with one wrong weight
        assert victim.stat().st_size == size
    with caplog.at_level("WARNING"):
        trainer = GRPOTrainer(load_recipe(None, overrides(out, data, "training.resume_from=latest", "training.max_steps=5")))
    assert trainer.resume_path == out / "checkpoints" / "step-000002"
    skipped = [r.message for r in caplog.records if "step-000004" in r.message and "damaged" in r.message]
    assert len(skipped) == 1 and "model/model.safetensors" in skipped[0] and "resuming from step-000002" in skipped[0]
    if damage == "byte_flipped":
        assert "sha256" in skipped[0]
    trainer.train()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # steps 2 and 3 redone once, not logged twice


def fake_checkpoint(root: Path, step: int, run_id: str = "mine") -> Path:
    """A checkpoint folder as CheckpointManager.save leaves it: files, trainer state, hashed manifest."""
    folder = root / f"step-{step:06d}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    write_manifest(folder)
    return folder


def test_retention_never_deletes_the_last_intact_checkpoint(tmp_path, caplog):
    root = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(tmp_path / "run", keep=1, run_id="mine")
    fake_checkpoint(root, 2)
    flip_a_byte(fake_checkpoint(root, 4) / "model" / "model.safetensors")  # the newest, damaged in place
    assert damage(root / "step-000004") is not None and damage(root / "step-000002") is None
    with caplog.at_level("WARNING"):
        assert manager.prune() == []  # keep=1 would delete step-2: the only checkpoint a resume can use
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    assert any("keeping step-000002" in r.message for r in caplog.records)
    # once a newer intact checkpoint exists, the older ones go as usual
    assert [p.name for p in manager.prune(written=fake_checkpoint(root, 6))] == ["step-000002", "step-000004"]
    assert sorted(p.name for p in root.iterdir()) == ["step-000006"]


def test_the_final_checkpoint_is_written_once(tmp_path, synthetic_data, monkeypatch):
    """max_steps (4) a multiple of save_steps (2): step-4 is the periodic and the final checkpoint; and a
    resume from that final checkpoint has nothing to write."""
    out, data = tmp_path / "run", synthetic_data["counting"]
    writes: list[int] = []
    real_save = CheckpointManager.save

    def counted(self, learner, step, trainer_state, **kwargs):
        writes.append(step)
        return real_save(self, learner, step, trainer_state, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", counted)
    train(out, data, "training.max_steps=4", "training.save_steps=2")
    assert writes == [2, 4]
    final = out / "checkpoints" / "step-000004"
    inode = final.stat().st_ino
    train(out, data, "training.max_steps=4", "training.resume_from=latest")
    assert writes == [2, 4] and final.stat().st_ino == inode  # not rewritten


def test_latest_with_no_checkpoint_starts_at_step_0_also_after_a_kill(tmp_path, synthetic_data, tiny_cache):
    """A preemptible job: every launch says resume_from=latest. The first launch finds an empty folder; it is
    killed (SIGKILL) before its first checkpoint; the next launch must start again, not refuse the folder."""
    out, data = tmp_path / "run", synthetic_data["counting"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    cmd = [str(BIN / "r1-mm"), "train", str(recipe), *overrides(out, data, "training.resume_from=latest")]
    env = {**os.environ, "R1MM_CACHE": str(tiny_cache.parent)}
    first_log = tmp_path / "first.log"
    with first_log.open("w") as err:
        proc = subprocess.Popen([*cmd, "training.max_steps=500", "training.save_steps=null"], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
            assert proc.poll() is None, first_log.read_text()[-3000:]
            time.sleep(0.05)
        proc.kill()
        proc.wait(60)
    assert "resume_from=latest: no checkpoint yet" in first_log.read_text()  # said on the first launch too
    assert not list((out / "checkpoints").glob("step-*"))  # the premise: killed before any checkpoint
    restarted = subprocess.run([*cmd, "training.max_steps=3"], env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    said = [line for line in restarted.stderr.splitlines() if "no checkpoint in" in line]
    assert len(said) == 1 and "starting from step 0" in said[0] and "metrics.jsonl" in said[0], restarted.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # the killed attempt's lines are gone, none logged twice
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


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
    from r1_mm.rollout.servers import free_port
    from r1_mm.run.checkpoint import damage

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
