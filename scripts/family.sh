#!/usr/bin/env bash
# Evaluate members without retraining: NPROC=1 bash scripts/family.sh [CONFIG] [key=value ...]
exec bash "$(dirname "$0")/launch.sh" family configs/deit_small_search.yaml "$@"
