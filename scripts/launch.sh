#!/usr/bin/env bash
# Run one spp command, under torchrun when NPROC > 1:
#   NPROC=8 bash scripts/launch.sh COMMAND DEFAULT_CONFIG [CONFIG] [key=value ...]
# A CONFIG given before the overrides replaces DEFAULT_CONFIG.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND=$1
CONFIG=$2
shift 2
if [[ $# -gt 0 && "$1" != *=* ]]; then CONFIG=$1; shift; fi
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" -m spp "$COMMAND" "$CONFIG" "$@"
fi
exec python3 -m spp "$COMMAND" "$CONFIG" "$@"
