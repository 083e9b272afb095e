#!/usr/bin/env bash
# Evaluate family members without retraining:  bash scripts/family.sh [CONFIG] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/deit_small_search.yaml
if [[ $# -gt 0 && "$1" != *=* ]]; then CONFIG=$1; shift; fi
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" -m spp family "$CONFIG" "$@"
fi
exec python3 -m spp family "$CONFIG" "$@"

