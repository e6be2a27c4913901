#!/usr/bin/env bash
# Write the lock (constraints.txt) from a virtual environment that passed the suite: every installed package at
# its exact version, vlmtune itself left out. Usage: scripts/lock.sh [VENV]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
{
  echo "# The tested stack: scripts/setup.sh and CI install with --constraint constraints.txt."
  echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) from Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())') on $(uname -m) Linux."
  echo "# Constraints pin versions without installing anything: platform-specific packages (the nvidia-* CUDA"
  echo "# libraries of the Linux torch wheel) apply only where pip would install them."
  "$VENV/bin/python" -m pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$//' | grep -viE '^(vlmtune|pip|setuptools|wheel)=='
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
