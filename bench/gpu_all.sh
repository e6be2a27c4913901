#!/usr/bin/env bash
# One lent-GPU session's checks in one call, about 8 minutes on an H100 (carry .whl: bash bench/gpu_wheels.sh):
#   1. bench/gpu_smoke.sh      FSDP2 under torchrun: full (+ checkpoint), LoRA with packing (varlen attention),
#                              cpu_offload, resume
#   2. bench/gpu_varlen.py     train.attention=varlen and train.compile on CUDA: kernel vs sdpa, tiny models end to
#                              end (bf16 vs fp32), host syncs stock vs varlen, regional compile without recompiles,
#                              pinned micro-batches from the collation thread
#   3. bench/gpu.sh            the 3B benchmark (issue 19's "Measure it honestly"): global batch 64, timed window,
#                              median/p10/p90, data wait, profiled step, MFU with and without the vision tower.
#                              Runs, in this order (the time budget drops the last ones first): full fine-tune on
#                              receipts packed 8k (varlen), the stock padded baseline (micro-batch 4, transformers'
#                              attention), LoRA packed 8k, the mixed workload packed 8k, full packed 16k
# (bench/gpu_kernels.py, the Liger check, runs on its own: ~1 minute.)
# Each part has its own time limit, so one that fails or hangs does not cost the others. Writes to OUT_DIR (default
# $OUT): smoke.txt, varlen.txt + varlen.json, bench-table.md, bench-summary.json, bench-log.txt,
# profile-*.txt, env.txt.
#
#   bash bench/gpu_all.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-runs/gpu-all}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 1
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
STATUS=0

timeout 110 bash bench/gpu_smoke.sh /tmp/vlmtune-smoke > "$OUT_DIR/smoke.txt" 2>&1 || STATUS=1
tail -n 3 "$OUT_DIR/smoke.txt"

# gpu_smoke.sh installed the carried wheels into /tmp/vlmtune-site
PYTHONPATH=/tmp/vlmtune-site:$PWD timeout 90 "$PYTHON" bench/gpu_varlen.py --out "$OUT_DIR/varlen.json" \
  > "$OUT_DIR/varlen.txt" 2>&1 || STATUS=1
grep -E "FAIL|syncs|compile\)|first micro-batch|pinned|\[gpu_varlen\]" "$OUT_DIR/varlen.txt" | tail -n 9

RUNS=full-receipts-packed8k,full-receipts-padded4-stock,lora-receipts-packed8k,full-mixed-packed8k
GPU_BENCH_DEADLINE_S=${GPU_BENCH_DEADLINE_S:-280} bash bench/gpu.sh /tmp/vlmtune-bench --workloads receipts,mixed \
  --budgets 8192,16384 --packing on,off --attention varlen,stock --window-s 30 --min-window-steps 3 \
  --warmup-steps 1 --n-samples 128 --only $RUNS,full-receipts-packed16k \
  > "$OUT_DIR/bench-log.txt" 2>&1 || STATUS=1
for f in table.md:bench-table.md summary.json:bench-summary.json env.txt:env.txt; do
  cp "/tmp/vlmtune-bench/${f%%:*}" "$OUT_DIR/${f##*:}" 2>/dev/null
done
cp /tmp/vlmtune-bench/profile-*.txt "$OUT_DIR/" 2>/dev/null
cat "$OUT_DIR/bench-table.md" 2>/dev/null || tail -n 20 "$OUT_DIR/bench-log.txt" 2>/dev/null
echo "[gpu_all] $([ $STATUS -eq 0 ] && echo OK || echo 'a part FAILED') (exit $STATUS)"
exit $STATUS
