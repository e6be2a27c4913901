#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the wheels that bench/gpu.sh installs on a GPU machine without network:
# the versions of this checkout's .venv, built for that machine's Python (default 3.12, x86-64 Linux).
# The lent machines' image has torch, torchvision, accelerate, tokenizers, huggingface_hub, safetensors, pyarrow,
# pandas, xxhash and triton, but an older transformers and no datasets, pydantic or liger-kernel.
#
#   bash bench/gpu_wheels.sh                 # then carry .whl with the run (device tool: carry [".whl"])
#   PY_VERSION=3.11 EXTRA="pyarrow" bash bench/gpu_wheels.sh
#   EXTRA=bitsandbytes bash bench/gpu_wheels.sh   # + QLoRA in gpu_smoke.sh (+43 MB: over the 64 MiB carry with the rest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
# fsspec: datasets 5.2 wants <= 2026.9. The machine's huggingface_hub (1.33) and tokenizers (0.23.2) suit
# transformers 5.24; hub 2.x would need httpx2, which is not there.
PACKAGES="transformers datasets peft pydantic pydantic_core annotated_types typing_inspection typing_extensions dill \
multiprocess regex fsspec ${EXTRA:-}"
PINS=$("$PY" - $PACKAGES <<'EOF'
import importlib.metadata as md, sys

def pin(name):  # the .venv's version; a package it lacks (bitsandbytes on CPU): the newest
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return name

print(" ".join(map(pin, sys.argv[1:])))
EOF
)
echo "[gpu_wheels] $PINS"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PINS
# Not in the .venv (CPU only): Liger Kernel for train.kernels=liger (bench/gpu_kernels.py); Triton is on the machine.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
ls -la .whl
echo "[gpu_wheels] $(du -sh .whl | cut -f1) in .whl (the device tool carries at most 64 MiB with the working tree)"
