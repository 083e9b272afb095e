#!/usr/bin/env bash
# The LLM demo: tokenizer + small Llama pretrained on the Python docs (cached) → search → family → export → finetune.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -d /usr/share/doc/python3.11/html/_sources ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing the Python documentation's sources (Debian package python3.11-doc)"
    apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null
  else
    echo "the Python documentation is not installed: run 'sudo apt-get install python3.11-doc'," \
         "or give the demo another folder of text: make demo-llm ARGS='data.root=FOLDER'" >&2
  fi
fi
exec python3 -m spp demo-llm "$@"
