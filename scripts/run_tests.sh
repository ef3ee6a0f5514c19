#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the whole test suite, slow multi-process tests included.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
exec .venv/bin/python -m pytest -ra --durations=60 "$@"
