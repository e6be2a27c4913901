#!/usr/bin/env bash
# FSDP2 smoke test on a lent GPU machine: short fine-tunes of a synthetic model under torchrun, one process per
# visible GPU, offline. distributed.strategy=fsdp2 is explicit, so one GPU runs FSDP2 for real (a process group
# of one) rather than plain single-process training. Runs, 10 steps each:
#   full     full fine-tune (on CUDA: bf16 compute, fp32 master weights and gradient reduction), activation
#            checkpointing of the language model, a checkpoint at step 5 (and 10)
#   lora     LoRA, with train.packing (FSDP2 + packed rows through train.attention=varlen, the default)
#   offload  full fine-tune with distributed.cpu_offload=true
#   qlora    LoRA on 4-bit NF4 weights (peft.quantize=4bit), one process, to a saved adapter (needs bitsandbytes)
#   resume   a copy of `full` without its step-10 checkpoint and final model, run again with resume=auto: it must
#            continue from step 5 and repeat full's losses of steps 6-10
# Prints each run's per-step loss, grad norm and tokens/s, and exits non-zero if any run fails. About 1.5 minutes
# on an H100 with the tiny model; needs nothing from the network.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]        # OUT_DIR default: $OUT, else runs/gpu-smoke
#   SMOKE_SIZE=mid bash bench/gpu_smoke.sh   # a ~0.5B-parameter synthetic Qwen2.5-VL instead of the tiny one
#   SMOKE_CPU=1 bash bench/gpu_smoke.sh      # dry check without a GPU: the same runs, one process on CPU (gloo)
#
# Python: $PYTHON, else the repo's .venv if its torch sees a GPU (or SMOKE_CPU=1), else python3 (carried wheels in
# .whl/ are installed into /tmp first, as bench/gpu.sh does).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${1:-${OUT:-runs/gpu-smoke}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 1
CPU=${SMOKE_CPU:-0}
SIZE=${SMOKE_SIZE:-tiny}
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && { [ "$CPU" = 1 ] ||
    .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }; then
  PY=.venv/bin/python
else
  PY=python3
fi
if [ "$CPU" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlmtune-site \
    .whl/*.whl || echo "[gpu_smoke] warning: the wheel install failed; going on with the machine's packages"
  export PYTHONPATH=/tmp/vlmtune-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$CPU" = 1 ]; then
  NPROC=1 DEVICE=cpu
  echo "[gpu_smoke] SMOKE_CPU=1: one process on CPU"
else
  NPROC=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0) DEVICE=cuda
  if [ "$NPROC" -lt 1 ]; then echo "[gpu_smoke] no CUDA GPU visible; nothing to do (SMOKE_CPU=1: a CPU dry check)"; exit 1; fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 8 | tee "$OUT_DIR/nvidia-smi.txt"
fi
SCRIPT_START=$(date +%s)

# Inputs: the synthetic model (tiny, or SMOKE_SIZE=mid) and synthetic receipts, written once.
"$PY" - "$OUT_DIR" "$SIZE" <<'PY' || exit 1
import sys
from pathlib import Path

from vlmtune.data.synthetic import write_synthetic_cord
from vlmtune.demo import build_tiny_qwen2_5_vl

out, size = Path(sys.argv[1]), sys.argv[2]
extra = {} if size == "tiny" else dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2)
build_tiny_qwen2_5_vl(out / f"model-{size}", **extra)
write_synthetic_cord(out / "data", n_train=64, n_validation=8)
PY

STATUS=0
# finetune NAME [key=value ...]: one torchrun launch into $OUT_DIR/run-NAME; prints its steps; STATUS=1 if it fails.
finetune() {
  local name=$1 run=$OUT_DIR/run-$1 start rc
  shift
  start=$(date +%s)
  timeout 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m vlmtune finetune \
    output_dir="$run" model.name_or_path="$OUT_DIR/model-$SIZE" \
    data.train.source="$OUT_DIR/data" data.train.format=cord_v2 train.device=$DEVICE \
    train.max_steps=10 train.micro_batch_size=2 train.global_batch_size=$((2 * NPROC)) train.lr=1e-4 \
    train.max_length=512 train.log_every_steps=1 distributed.strategy=fsdp2 distributed.timeout_s=120 "$@" \
    > "$OUT_DIR/log-$name.txt" 2>&1
  rc=$?
  echo "[gpu_smoke] $name: exit $rc in $(( $(date +%s) - start )) s on $NPROC process(es) ($DEVICE)"
  # On failure the rank's own traceback, not torchrun's summary of it (that says only "exitcode 1").
  [ "$rc" -eq 0 ] || { grep -m1 -A40 "Traceback" "$OUT_DIR/log-$name.txt" || tail -n 40 "$OUT_DIR/log-$name.txt"; STATUS=1; }
  "$PY" - "$run" <<'PY' || STATUS=1
import json, math, sys
from pathlib import Path

run = Path(sys.argv[1])
metrics = run / "metrics.jsonl"
steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r] if metrics.exists() else []
for r in steps:
    loss, norm = (f"{v:.4f}" if v is not None else "nan" for v in (r["loss"], r["grad_norm"]))
    print(f"  step {r['step']:3d}  loss {loss}  grad_norm {norm}  tok/s {r['tokens_per_s']:.0f}")
final = run / "final"
print(f"  final folder: {sorted(p.name for p in final.iterdir()) if final.is_dir() else 'MISSING'}")
bad = [r["step"] for r in steps if r["loss"] is None or not math.isfinite(r["loss"])]
if [r["step"] for r in steps] != list(range(1, 11)) or bad or not final.is_dir():
    sys.exit(f"  FAILED: steps {[r['step'] for r in steps]}, non-finite at {bad}, final folder {final.is_dir()}")
PY
}

finetune full distributed.activation_checkpointing=language checkpoint.every_steps=5
finetune lora peft.method=lora peft.r=16 peft.dropout=0.0 train.packing=true
finetune offload distributed.cpu_offload=true
# QLoRA to a saved adapter: NF4 weights through bitsandbytes, one process (no FSDP2: the 4-bit weights stay whole)
if [ "$CPU" != 1 ] && "$PY" -c "import bitsandbytes" 2>/dev/null; then
  finetune qlora peft.method=lora peft.quantize=4bit train.packing=true distributed.strategy=none
else
  echo "[gpu_smoke] qlora: not run (needs CUDA and bitsandbytes: EXTRA=bitsandbytes bash bench/gpu_wheels.sh)"
fi

# resume: the full run as if it had stopped after step 5's checkpoint
rm -rf "$OUT_DIR/run-resume"
cp -r "$OUT_DIR/run-full" "$OUT_DIR/run-resume" &&
  rm -rf "$OUT_DIR/run-resume/final" "$OUT_DIR/run-resume/summary.json" "$OUT_DIR/run-resume/checkpoints/step-000010"
finetune resume distributed.activation_checkpointing=language checkpoint.every_steps=5 resume=auto
grep -q "resumed from .*step-000005" "$OUT_DIR/log-resume.txt" || { echo "  FAILED: did not resume from step 5"; STATUS=1; }
"$PY" - "$OUT_DIR" <<'PY' || STATUS=1
import json, sys
from pathlib import Path

def losses(name):
    rows = (Path(sys.argv[1]) / f"run-{name}" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, rows) if "loss" in r and r["step"] > 5}

full, resumed = losses("full"), losses("resume")
diff = max(abs(full[s] - resumed[s]) for s in full) if full.keys() == resumed.keys() and full else float("inf")
print(f"  resume vs full, steps 6-10: max |loss difference| {diff:.2e}")
if not diff <= 1e-2:
    sys.exit("  FAILED: the resumed run does not continue the full run")
PY

echo "[gpu_smoke] $([ $STATUS -eq 0 ] && echo OK || echo FAILED) in $(( $(date +%s) - SCRIPT_START )) s; logs in $OUT_DIR"
exit $STATUS
