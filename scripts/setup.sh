#!/usr/bin/env bash
# Create .venv with vlmtune, its test tools and the optional integrations CI tests, at the versions CI proves:
# every package is pinned by constraints.txt (the lock; scripts/check_latest.sh tries the newest releases).
# torch and torchvision go first as a pair: several processors (Qwen*, Llama 4, Mistral3, every video processor)
# need torchvision, and this pair works on CPU and CUDA alike.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --constraint constraints.txt)
"${PIP[@]}" torch torchvision
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, transformers, vlmtune; print('vlmtune ready: torch', torch.__version__, \
'| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
