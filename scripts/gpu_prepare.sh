#!/usr/bin/env bash
# Prepare, on a machine with a package index, what scripts/gpu_check.sh needs on a GPU machine without
# one (git ignores all three):
#   .whl/                                   wheels of timm, torch-pruning and transformers (with its
#                                           dependencies) for that machine's Python (PYTHON_VERSION, default 3.12)
#   data/fashion-mnist/                     a copy of the Debian package's Fashion-MNIST files
#   outputs/demo/pretrain/best.safetensors  the demo's pretrained ViT (`make demo` writes it)
# Prints the paths to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
TIMM=$(python3 -c "import timm; print(timm.__version__)")
TORCH_PRUNING=$(python3 -c "import importlib.metadata as m; print(m.version('torch-pruning'))")
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" -d .whl \
  "timm==$TIMM" "torch-pruning==$TORCH_PRUNING"
TRANSFORMERS=$(python3 -c "import transformers; print(transformers.__version__)")
python3 -m pip download -q --only-binary=:all: --python-version "$PYTHON_VERSION" -d .whl "transformers==$TRANSFORMERS" \
  && rm -f .whl/torch-*.whl .whl/nvidia_*.whl .whl/triton-*.whl   # the GPU machine has its own PyTorch
ls .whl
if [ -d /usr/share/datasets/fashion-mnist ]; then
  mkdir -p data && rm -rf data/fashion-mnist && cp -r /usr/share/datasets/fashion-mnist data/
else
  echo "no /usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist first" >&2
  exit 1
fi
CHECKPOINT=outputs/demo/pretrain/best.safetensors
[ -f "$CHECKPOINT" ] || echo "warning: $CHECKPOINT missing (make demo writes it); the GPU run will pretrain first" >&2
echo "carry: .whl data/fashion-mnist $CHECKPOINT"
du -shc .whl data/fashion-mnist "$CHECKPOINT" 2>/dev/null | tail -1
