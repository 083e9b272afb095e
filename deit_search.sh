#!/usr/bin/env bash
# SPP search on a GPU node: NPROC=8 bash deit_search.sh [CONFIG] [key=value ...] (default: DeiT-Small, ImageNet)
exec bash "$(dirname "$0")/scripts/launch.sh" search configs/deit_small_search.yaml "$@"
