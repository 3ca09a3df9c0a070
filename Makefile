# The two commands of the README: `make generate` and `make test`.
# Both create/refresh .venv from requirements.txt on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: generate chat test test-fast labs check-labs grade clean-venv

$(STAMP): requirements.txt pyproject.toml scripts/install.sh
	bash scripts/install.sh

## the main job for now: chat with the default model in the terminal
generate: $(STAMP)
	$(PY) -m minisys chat

## the whole test suite (what CI runs)
test: $(STAMP)
	$(PY) -m pytest

## regenerate the student notebooks in labs/ from solutions/
labs: $(STAMP)
	$(PY) -m minisys labs build

check-labs: $(STAMP)
	$(PY) -m minisys labs check

## grade a notebook: make grade NB=labs/01-tokens-to-text.ipynb
grade: $(STAMP)
	$(PY) -m minisys grade $(NB)

clean-venv:
	rm -rf $(VENV)
