# The two commands of the README. Each installs what it needs first and is safe to rerun.
PYTHON ?= python3

.PHONY: install test demo demo-llm demo-clip

install:
	$(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest -q tests

demo: install
	bash scripts/demo.sh

demo-llm: install
	bash scripts/demo_llm.sh $(ARGS)

demo-clip: install
	bash scripts/demo_clip.sh $(ARGS)
