#!/usr/bin/env bash
# Create .venv with vlmtune, its test tools and the optional integrations CI tests, at the versions CI proves:
# every package is pinned by constraints.txt (the lock; scripts/check_latest.sh tries the newest releases).
# torch and torchvision go first as a pair: several processors (Qwen*, Llama 4, Mistral3, every video processor)
# need torchvision, and this pair works on CPU and CUDA alike. The run-report tests drive headless Chromium: it is
# installed from Debian's packages when missing and this runs as root (else: say how).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --constraint constraints.txt)
"${PIP[@]}" torch torchvision
"${PIP[@]}" -e ".[dev]"
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium (headless; the run-report tests open reports in it)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "setup: note: no Chromium found; tests/test_report.py needs one (e.g. sudo apt-get install chromium)" >&2
  fi
fi
.venv/bin/python -c "import torch, torchvision, transformers, vlmtune; print('vlmtune ready: torch', torch.__version__, \
'| torchvision', torchvision.__version__, '| transformers', transformers.__version__)"
