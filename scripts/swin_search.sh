#!/usr/bin/env bash
# Swin-Tiny search: NPROC=8 bash scripts/swin_search.sh [CONFIG] [key=value ...]
exec bash "$(dirname "$0")/launch.sh" search configs/swin_tiny_search.yaml "$@"
