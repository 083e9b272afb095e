#!/usr/bin/env bash
# Finetune an exported CLIP member (contrastive loss, optional distillation of the dense model's similarities;
# the search configs hold the train section: 5 epochs at lr 1e-5, UPop's schedule):
#   NPROC=8 bash scripts/clip_retrain.sh configs/clip_large_coco_search.yaml output=outputs/clip_large_coco_retrain \
#     train.source=outputs/clip_large_coco_search/pruned [key=value ...]
exec bash "$(dirname "$0")/launch.sh" retrain configs/clip_large_coco_search.yaml "$@"
