#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the demo job on the embedded tiny model + synthetic data.
# Extra arguments go to `r1-mm demo` (e.g. --out runs/demo2 training.max_steps=8).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE="${WANDB_MODE:-offline}"
exec .venv/bin/r1-mm demo "$@"
