"""GPU set-up checks, one line and exit 2 each, so that a GPU machine never silently trains on the CPU.

Why: requirements/lock-gpu.txt is CUDA 13 (torch 2.13.0 with nvidia-cuda-runtime 13, cudnn/nccl cu13),
which needs an NVIDIA driver of the R580 branch or newer. On an older driver the install succeeds, torch
imports, `torch.cuda.is_available()` is False, and every run took the CPU branches without a word.

  python scripts/check_cuda.py driver        before installing: the driver nvidia-smi reports is new enough
  python scripts/check_cuda.py torch PYTHON  after installing: PYTHON's torch sees a CUDA device
"""

from __future__ import annotations

import subprocess
import sys

MIN_DRIVER = (580, 0)  # CUDA 13.0's minimum Linux driver (NVIDIA's CUDA 13.0 release notes)
LOCK = "requirements/lock-gpu.txt (CUDA 13)"


def parse_driver(text: str) -> tuple[int, ...] | None:
    """'575.57.08' -> (575, 57, 8); the first GPU's line when several are listed."""
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    try:
        return tuple(int(part) for part in first.split("."))
    except ValueError:
        return None


def check_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"setup.sh: nvidia-smi did not answer ({exc}); use --cpu for a machine without a usable GPU"
    version = parse_driver(out)
    if version is None:
        return f"setup.sh: could not read the NVIDIA driver version from nvidia-smi ({out.strip()[:80]!r})"
    if version[:2] < MIN_DRIVER:
        have, need = ".".join(map(str, version)), ".".join(map(str, MIN_DRIVER))
        return (f"setup.sh: the NVIDIA driver is {have}, but {LOCK} needs {need} or newer: update the driver "
                "(or run with --cpu); nothing was installed")
    return None


CUDA_PROBE = "import torch; print(torch.cuda.is_available(), torch.version.cuda, torch.__version__)"


def check_torch(python: str) -> str | None:
    proc = subprocess.run([python, "-c", CUDA_PROBE], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return f"setup.sh: torch does not import in {python}: {proc.stderr.strip().splitlines()[-1:]}"
    available, cuda, version = proc.stdout.split()
    if available != "True":
        return (f"setup.sh: torch {version} (CUDA {cuda}) was installed but sees no CUDA device "
                f"(torch.cuda.is_available() is False): check the driver against {LOCK}, or use --cpu")
    return None


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[1] == "driver":
        problem = check_driver()
    elif len(argv) >= 3 and argv[1] == "torch":
        problem = check_torch(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if problem:
        print(problem, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
