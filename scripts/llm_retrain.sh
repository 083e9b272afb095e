#!/usr/bin/env bash
# Finetune an exported LLM member (next-token loss, optional distillation from the dense model; the search
# configs hold the train section: LoRA rank 8, 1,000 steps):
#   NPROC=8 bash scripts/llm_retrain.sh configs/llama2_7b_search.yaml output=outputs/llama2_7b_retrain \
#     train.source=outputs/llama2_7b_search/pruned [key=value ...]
# train.lora_rank > 0 trains LoRA adapters (peft) and merges them into the saved model; 0 trains every weight, which
# under DDP keeps the weights and AdamW state on every GPU; model.fsdp=true shards both with FSDP2 (a 70B model:
# configs/llama2_70b_search.yaml).
# Usage: NPROC=8 bash scripts/llm_retrain.sh configs/llama2_70b_search.yaml output=... train.source=...
exec bash "$(dirname "$0")/launch.sh" retrain configs/llama2_7b_search.yaml "$@"
