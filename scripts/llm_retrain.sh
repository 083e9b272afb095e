#!/usr/bin/env bash
# Finetune an exported LLM member (all weights, next-token loss, optional distillation from the dense model):
#   NPROC=8 bash scripts/llm_retrain.sh CONFIG train.source=outputs/llama2_7b_search/pruned [key=value ...]
# Full finetuning under DDP keeps a whole copy of the weights and AdamW state on every GPU: it fits members of
# small models, not a 7B one (LoRA and FSDP2 are not in spp yet).
exec bash "$(dirname "$0")/launch.sh" retrain configs/llama2_7b_search.yaml "$@"
