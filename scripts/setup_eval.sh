#!/usr/bin/env bash
# Creates (or refreshes) .venv-eval for `r1-mm eval --lmms-eval`: lmms-eval and the versions it pins,
# in a venv LAYERED on .venv (a .pth file puts .venv's packages after its own on the path), so torch,
# transformers, math-verify and the model code are the training stack's, and lmms-eval's lower pins
# (av 15, protobuf 6, wandb 0.25) stay out of .venv. lmms-eval goes in with --no-deps and its
# requirements without latex2sympy2 (requirements/eval.txt says why), so math-verify and antlr4 are
# the same in both venvs and `accuracy` scores alike in both (tests/test_environments.py).
# pip's own conflict warnings are off; scripts/check_env.py checks the result instead and waives only
# the conflicts it names.
# Idempotent (a stamp of its inputs). Needs .venv (scripts/setup.sh runs this at its end).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${R1MM_VENV:-.venv}"
EVAL="${R1MM_EVAL_VENV:-.venv-eval}"
PY="${R1MM_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
inputs=(scripts/setup_eval.sh scripts/check_env.py requirements/eval.txt requirements/eval-harness.txt
        requirements/lock-eval.txt)
stamp_value="$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1) $(readlink -f "$VENV")"
stamp="$EVAL/.r1mm-setup-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ] && "$EVAL/bin/python" -c "import lmms_eval, r1_mm" 2>/dev/null; then
  echo "setup_eval.sh: $EVAL is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || { echo "setup_eval.sh: $VENV is missing; run scripts/setup.sh first" >&2; exit 2; }
[ -x "$EVAL/bin/python" ] || "$PY" -m venv "$EVAL"
main_site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
eval_site="$("$EVAL/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$main_site" > "$eval_site/r1mm_training_stack.pth"
eval_pip() { "$EVAL/bin/python" -m pip --isolated install --disable-pip-version-check --no-warn-conflicts -q "$@"; }
eval_pip --no-deps -r requirements/eval-harness.txt
eval_pip -c requirements/lock-eval.txt -r requirements/eval.txt
"$EVAL/bin/python" -m pip --isolated uninstall -y -q latex2sympy2 antlr4-python3-runtime 2>/dev/null || true  # an older .venv-eval had them
"$VENV/bin/python" scripts/check_env.py "$EVAL/bin/python"
"$EVAL/bin/python" -c "import lmms_eval, torch, transformers, r1_mm; print('setup_eval.sh: ok lmms-eval', __import__('importlib.metadata').metadata.version('lmms_eval'), 'torch', torch.__version__)"
echo "$stamp_value" > "$stamp"
