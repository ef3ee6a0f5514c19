"""GPU set-up stops in one line where CUDA would not be usable, instead of installing a stack that
silently runs on the CPU. There is no GPU here: `nvidia-smi` is a stand-in script on PATH that answers
as a real one does (the test says so); the torch check runs against this machine's real torch, a CUDA
build that sees no device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
FAKE_SMI = """#!/bin/sh
case "$*" in
  *driver_version*) echo "{driver}" ;;
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
esac
"""


def fake_nvidia_smi(folder: Path, driver: str) -> dict[str, str]:
    script = folder / "nvidia-smi"
    script.write_text(FAKE_SMI.format(driver=driver))
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{folder}:{os.environ['PATH']}")


def test_old_driver_stops_setup_before_anything_is_installed(tmp_path):
    env = fake_nvidia_smi(tmp_path, "550.54.15")
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(env, R1MM_VENV=str(venv)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "550.54.15" in lines[0] and "580" in lines[0] and "--cpu" in lines[0]
    assert not venv.exists()  # the GPU stack was chosen (nvidia-smi -L answered) and stopped before pip


def test_new_enough_driver_passes(tmp_path):
    env = fake_nvidia_smi(tmp_path, "580.65.06")
    proc = subprocess.run([sys.executable, "scripts/check_cuda.py", "driver"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_torch_without_a_cuda_device_is_refused_in_one_line():
    assert not torch.cuda.is_available()  # the premise: this machine's torch sees no device
    proc = subprocess.run([sys.executable, "scripts/check_cuda.py", "torch", sys.executable], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "torch.cuda.is_available() is False" in lines[0] and torch.__version__ in lines[0]
