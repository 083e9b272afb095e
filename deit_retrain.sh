#!/usr/bin/env bash
# Finetune a family member on a GPU cluster node:  NPROC=8 bash deit_retrain.sh [CONFIG] [key=value ...]
# Default config: DeiT-Small on ImageNet (configs/deit_small_retrain.yaml).
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=configs/deit_small_retrain.yaml
if [[ $# -gt 0 && "$1" != *=* ]]; then CONFIG=$1; shift; fi
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" -m spp retrain "$CONFIG" "$@"
fi
exec python3 -m spp retrain "$CONFIG" "$@"

