#!/usr/bin/env bash
# GPU benchmark of vlmtune on one CUDA GPU (written for a lent H100 / H200): a Qwen2.5-VL-3B-sized model with
# random weights, full fine-tune and LoRA at bf16, packing off and on.
# Needs nothing from the network. About 4 minutes on an H100; stops starting new runs after 450 s.
#
#   bash bench/gpu.sh [OUT_DIR] [gpu_bench.py options...]      # OUT_DIR default: $OUT, else runs/bench-gpu
#
# Python: $PYTHON if set, else the repo's .venv if its torch sees a GPU, else python3. If wheels were carried in
# .whl/ (made with `bash bench/gpu_wheels.sh` on a machine with PyPI), they are installed into /tmp first and
# put ahead of the machine's own packages: the lent machines' image has torch but an older transformers and no
# datasets or pydantic. Writes OUT_DIR/summary.json, table.md, log.txt, nvidia-smi.txt and env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${OUT:-runs/bench-gpu}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT_DIR=$1; shift; fi
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
START=$(date +%s)

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=python3
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "[gpu.sh] installing $(ls .whl/*.whl | wc -l) carried wheel(s) into /tmp/vlmtune-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlmtune-site \
    .whl/*.whl || echo "[gpu.sh] warning: the wheel install failed; going on with the machine's packages"
  export PYTHONPATH=/tmp/vlmtune-site${PYTHONPATH:+:$PYTHONPATH}
fi
# vlmtune from this checkout (not necessarily installed there)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
  echo "python: $PY ($("$PY" --version 2>&1))"
  echo "PYTHONPATH: $PYTHONPATH"
  "$PY" - <<'EOF' 2>&1
import importlib
for name in ("torch", "torchvision", "transformers", "datasets", "peft", "accelerate", "pydantic", "pyarrow",
             "tokenizers", "huggingface_hub", "regex", "vlmtune"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {getattr(m, '__file__', '')}")
    except Exception as e:
        print(f"{name}: cannot import ({type(e).__name__}: {e})")
try:
    import torch
    print("cuda:", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as e:
    print("cuda: ?", e)
EOF
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "[gpu.sh] nvidia-smi not available"

if ! "$PY" bench/gpu_bench.py --check "$@"; then
  echo "[gpu.sh] environment check failed (see above and $OUT_DIR/env.txt)"
  exit 3
fi
# A hard stop a little past the script's own 450 s budget, so the whole thing stays under 8 minutes.
LEFT=$(( ${GPU_BENCH_DEADLINE_S:-470} - ($(date +%s) - START) ))
timeout --kill-after=10 "$LEFT" "$PY" bench/gpu_bench.py --out "$OUT_DIR" --budget-s $(( LEFT - 20 )) "$@" 2>&1 \
  | tee "$OUT_DIR/log.txt"
STATUS=${PIPESTATUS[0]}
echo "[gpu.sh] done in $(( $(date +%s) - START )) s (exit $STATUS); results in $OUT_DIR"
exit "$STATUS"
