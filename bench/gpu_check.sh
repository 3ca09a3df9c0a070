#!/usr/bin/env bash
# The one-shot GPU check (minisys/bench/gpu_check.py): correctness on CUDA, throughput vs transformers,
# batch-1 decode with and without CUDA graphs; JSON to bench/results/gpu_check_<device>.json.
#   bash bench/gpu_check.sh                                # the model cache is on this machine
#   bash bench/gpu_check.sh --random-weights .gpu/model    # a bare GPU machine: run bench/gpu_prepare.sh
#                                                          # first where a registry is, and carry .gpu
#   bash bench/gpu_check.sh --dry-run                      # CPU, tiny sizes (CI runs it)
# Nothing is fetched. Wheels carried in .gpu/whl (bench/gpu_prepare.sh) are unpacked into a temporary
# folder put on PYTHONPATH when the machine's Python lacks those packages (the server, the openai client).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
EXTRA=""
if ! "$PY" -c "import fastapi, uvicorn, openai, llguidance, gguf" 2>/dev/null && compgen -G ".gpu/whl/*.whl" > /dev/null; then
  EXTRA="$(mktemp -d /tmp/minisys-site-XXXX)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$EXTRA" .gpu/whl/*.whl
fi
export PYTHONUNBUFFERED=1
exec env PYTHONPATH="$PWD${EXTRA:+:$EXTRA}${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m minisys bench gpu "$@"
