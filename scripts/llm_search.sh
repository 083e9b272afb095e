#!/usr/bin/env bash
# SPP search on a decoder LLM, on a GPU node: NPROC=8 bash scripts/llm_search.sh [CONFIG] [key=value ...]
# (default: Llama-2-7B; configs/llama3_8b_search.yaml, mistral_7b_search.yaml, opt_6.7b_search.yaml)
exec bash "$(dirname "$0")/launch.sh" search configs/llama2_7b_search.yaml "$@"
