#!/usr/bin/env bash
# The one-shot GPU check (minisys/bench/gpu_check.py): correctness on CUDA, throughput vs transformers,
# batch-1 decode with and without CUDA graphs; JSON to bench/results/gpu_check_<device>.json.
# Installs nothing. Usage: bash bench/gpu_check.sh [--dry-run] [--skip throughput] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m minisys bench gpu "$@"
