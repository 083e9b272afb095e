#!/usr/bin/env bash
# Select, compress and save one member: bash scripts/export.sh [CONFIG] export.remove=0.5 [key=value ...]
exec bash "$(dirname "$0")/launch.sh" export configs/deit_small_search.yaml "$@"
