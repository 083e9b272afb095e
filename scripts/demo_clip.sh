#!/usr/bin/env bash
# The CLIP demo: a small CLIP trained on Fashion-MNIST images + captions (cached) → search → family → export → finetune.
SPP_DEMO=demo-clip exec bash "$(dirname "$0")/demo.sh" "$@"
