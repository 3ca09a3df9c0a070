#!/usr/bin/env bash
# Create or refresh the local virtual environment in .venv.
#
# torch comes first and on purpose: on a machine without an NVIDIA GPU we
# take the CPU build (pinned, from PyTorch's CPU index if it is reachable,
# else whatever local wheel pip's find-links offers); on a machine with
# `nvidia-smi` we take the default build from PyPI, which ships CUDA.
# Override with TORCH_SPEC="torch==X.Y.Z" if you need another version.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo ">> NVIDIA GPU found: installing the CUDA build of torch"
        $PIP install "${TORCH_SPEC:-torch>=2.4}"
    else
        echo ">> no GPU: installing the CPU build of torch"
        CPU_INDEX=https://download.pytorch.org/whl/cpu
        if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/', timeout=5)" 2>/dev/null; then
            $PIP install "${TORCH_SPEC:-torch==2.13.0}" --extra-index-url "$CPU_INDEX"
        else                    # PyTorch's index unreachable: the package registry / find-links only
            $PIP install "${TORCH_SPEC:-torch==2.13.0}"
        fi
    fi
fi
echo ">> installing requirements.txt"
$PIP install -r requirements.txt
$PIP install --no-deps -e .
touch "$VENV/.installed"
