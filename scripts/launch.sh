#!/usr/bin/env bash
# Run one spp command, under torchrun when NPROC > 1:
#   NPROC=8 bash scripts/launch.sh COMMAND DEFAULT_CONFIG [CONFIG] [key=value ...]
# A CONFIG given before the overrides replaces DEFAULT_CONFIG. Relative paths (the config, and the
# output, checkpoint and data paths inside it) are taken from the directory the command is run in,
# as for any command; a config that is not there is looked up in this repository (e.g. configs/...).
# This checkout's spp runs, installed or not.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
COMMAND=$1
CONFIG=$ROOT/$2
shift 2
if [[ $# -gt 0 && "$1" != *=* ]]; then
  CONFIG=$1
  shift
  if [[ ! -e "$CONFIG" && "$CONFIG" != /* && -e "$ROOT/$CONFIG" ]]; then CONFIG=$ROOT/$CONFIG; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node="$NPROC" -m spp "$COMMAND" "$CONFIG" "$@"
fi
exec python3 -m spp "$COMMAND" "$CONFIG" "$@"
