#!/usr/bin/env bash
# Run HERE (a machine with a package registry and the model cache) before lending a GPU machine that has
# torch, transformers and triton but no registry. It fills .gpu/ (git-ignored, ~20 MB, under the 64 MiB a
# device call carries):
#   .gpu/whl/    cp312 manylinux wheels of what minisys needs beyond that image (server, client, grammars)
#   .gpu/model/  the default model's config.json + tokenizer files (the 98 MB GGUF does not fit: the check
#                runs on random weights of the same shape, --random-weights, which decode at the same speed)
# Then on the GPU:  bash bench/gpu_check.sh --random-weights .gpu/model      (carry .gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PYVER="${GPU_PYTHON_VERSION:-3.12}"
mkdir -p .gpu/whl .gpu/model
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 uvicorn==0.54.0 openai==3.57.0 distro==1.9.0 jiter==0.19.0 sniffio==1.3.1 \
  llguidance==1.9.1 gguf==0.19.0
PYTHONPATH="$PWD" "$PY" -c "
import shutil
from minisys.model.store import default_model_dir
d = default_model_dir(quiet=True)
for f in ('config.json', 'tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(d / f, '.gpu/model/' + f)
print('model config + tokenizer from', d)"
du -sh .gpu
