#!/usr/bin/env bash
# One lent-GPU session's checks in one call, about 8 minutes on an H100 (carry .whl: bash bench/gpu_wheels.sh):
#   1. bench/gpu_smoke.sh      FSDP2 under torchrun: full (+ checkpoint), LoRA, cpu_offload, resume
#   2. bench/gpu_kernels.py    train.kernels=liger computes what the torch path computes
#   3. bench/gpu.sh            the 3B benchmark: full packing off / on / on + Liger, LoRA packing on / off
#                              (in that order; the budget drops the last ones first)
# Each part has its own time limit, so one that fails or hangs does not cost the others. Writes to OUT_DIR (default
# $OUT): smoke.txt, kernels.txt, bench-table.md, bench-summary.json, bench-log.txt, env.txt.
#
#   bash bench/gpu_all.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu-all}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 1
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
STATUS=0

timeout 240 bash bench/gpu_smoke.sh /tmp/vlmtune-smoke > "$OUT_DIR/smoke.txt" 2>&1 || STATUS=1
tail -n 3 "$OUT_DIR/smoke.txt"

# gpu_smoke.sh installed the carried wheels into /tmp/vlmtune-site
PYTHONPATH=/tmp/vlmtune-site:$PWD timeout 150 "$PYTHON" bench/gpu_kernels.py > "$OUT_DIR/kernels.txt" 2>&1 || STATUS=1
tail -n 1 "$OUT_DIR/kernels.txt"

GPU_BENCH_DEADLINE_S=${GPU_BENCH_DEADLINE_S:-300} bash bench/gpu.sh /tmp/vlmtune-bench --steps 12 --exclude-steps 4 \
  --kernels torch,liger \
  --only full-packing-off,full-packing-on,full-packing-on-liger,lora-packing-on,lora-packing-off \
  > "$OUT_DIR/bench-log.txt" 2>&1 || STATUS=1
for f in table.md:bench-table.md summary.json:bench-summary.json env.txt:env.txt; do
  cp "/tmp/vlmtune-bench/${f%%:*}" "$OUT_DIR/${f##*:}" 2>/dev/null
done
cat "$OUT_DIR/bench-table.md" 2>/dev/null || tail -n 20 "$OUT_DIR/bench-log.txt" 2>/dev/null
echo "[gpu_all] $([ $STATUS -eq 0 ] && echo OK || echo 'a part FAILED') (exit $STATUS)"
exit $STATUS
