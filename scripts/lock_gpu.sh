#!/usr/bin/env bash
# Regenerates requirements/lock-gpu.txt with a resolver, for the GPU platform (Linux x86_64,
# manylinux_2_28, Python 3.11), from metadata only: nothing is installed or built here.
# tests/test_gpu_lock.py checks that the committed lock still resolves to the pinned vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
"$UV" pip compile requirements/gpu.in --python-platform x86_64-manylinux_2_28 --python-version 3.11 \
  --no-header --no-annotate --quiet -o requirements/lock-gpu.txt
sed -i '1i # GPU stack (Linux x86_64 + CUDA), resolved by scripts/lock_gpu.sh from requirements/gpu.in; used as pip constraints.' \
  requirements/lock-gpu.txt
echo "lock_gpu.sh: $(grep -cv '^#' requirements/lock-gpu.txt) pins; $(grep -E '^(vllm|torch)==' requirements/lock-gpu.txt | tr '\n' ' ')"
