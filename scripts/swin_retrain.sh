#!/usr/bin/env bash
# Swin-Tiny finetune: NPROC=8 bash scripts/swin_retrain.sh [CONFIG] [key=value ...]
exec bash "$(dirname "$0")/launch.sh" retrain configs/swin_tiny_retrain.yaml "$@"
