#!/usr/bin/env bash
# The main job: builds ./.venv if needed, then trains a tiny transformer by SFT on
# embedded 2-digit addition and prints its held-out exact-match accuracy.
# Usage: bash scripts/main.sh [--config.train.num_steps=... other overrides]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
workdir="${WORKDIR:-runs/sft_arith}"
exec "${CRITIC_JAX_VENV:-$root/.venv}/bin/python" scripts/train.py \
  --config=configs/sft_arith.py --workdir="$workdir" "$@"
