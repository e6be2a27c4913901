#!/usr/bin/env bash
# Create .venv with vlmtune and its test tools. torch and torchvision are installed first as a pinned pair:
# several processors (Qwen*, Llama 4, Mistral3, every video processor) need torchvision, and this pair
# works on CPU and CUDA alike.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, transformers, vlmtune; print('vlmtune ready: torch', torch.__version__, \
'| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
