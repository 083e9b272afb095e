#!/usr/bin/env bash
# Finetune a member on a GPU node: NPROC=8 bash deit_retrain.sh [CONFIG] [key=value ...] (default: DeiT-Small, ImageNet)
exec bash "$(dirname "$0")/scripts/launch.sh" retrain configs/deit_small_retrain.yaml "$@"
