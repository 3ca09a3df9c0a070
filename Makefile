# The two commands of the README: `make serve` and `make test` (`make generate`: chat in the terminal).
# Both create/refresh .venv from requirements.txt on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: serve generate chat test test-fast labs check-labs start grade grade-batch bundle clean-venv bench-deps

$(STAMP): requirements.txt pyproject.toml scripts/install.sh
	bash scripts/install.sh

## the main job: the OpenAI-compatible server on 127.0.0.1:8000 (make serve ARGS="--port 8001 --api-key k")
serve: $(STAMP)
	$(PY) -m minisys serve $(ARGS)

## chat with the default model in the terminal
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

## start a lab: copy its notebook to work/ (make start LAB=01; never overwrites your copy)
start: $(STAMP)
	$(PY) -m minisys labs start $(LAB)

## grade a notebook: make grade NB=work/01-tokens-to-text.ipynb
grade: $(STAMP)
	$(PY) -m minisys grade $(NB)

## grade every notebook of a folder into a CSV: make grade-batch DIR=submissions
grade-batch: $(STAMP)
	$(PY) -m minisys grade $(DIR)/*.ipynb --csv grades.csv

## the Gradescope autograder of a lab: make bundle NB=labs/03-paged-kv.ipynb
bundle: $(STAMP)
	$(PY) -m minisys grade --bundle $(NB) -o autograder.zip

## optional benchmark dependencies (llama.cpp for `python -m minisys bench latency`; compiles it: minutes)
bench-deps: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(VENV)/bin/pip install -r requirements-bench.txt

clean-venv:
	rm -rf $(VENV)
