#!/usr/bin/env bash
# Select, compress and save one member:  bash scripts/export.sh [CONFIG] export.remove=0.5 [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=configs/deit_small_search.yaml
if [[ $# -gt 0 && "$1" != *=* ]]; then CONFIG=$1; shift; fi
exec python3 -m spp export "$CONFIG" "$@"
