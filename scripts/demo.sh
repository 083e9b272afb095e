#!/usr/bin/env bash
# The README's demo: a tour of the library API on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/api_example.py
