#!/usr/bin/env bash
# The built-in demo: pretrain (cached) → search → family → export → retrain on Fashion-MNIST.
# SPP_DEMO=demo-clip runs the CLIP demo on the same images (scripts/demo_clip.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "Fashion-MNIST not installed: run 'sudo apt-get install dataset-fashion-mnist'," \
         "or let torchvision download it (online) into ~/.cache/spp" >&2
  fi
fi
exec python3 -m spp "${SPP_DEMO:-demo}" "$@"
