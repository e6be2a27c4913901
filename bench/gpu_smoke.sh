#!/usr/bin/env bash
# FSDP2 smoke test on a lent GPU machine: a short fine-tune of a synthetic model on every visible GPU (torchrun),
# full fine-tune then LoRA, offline. Prints each run's per-step loss, grad norm and tokens/s, and checks that
# the final folder (sharded save) exists. About 1-2 minutes; needs nothing from the network.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]        # OUT_DIR default: $OUT, else runs/gpu-smoke
#   SMOKE_SIZE=mid bash bench/gpu_smoke.sh   # a ~0.5B-parameter synthetic Qwen2.5-VL instead of the tiny one
#
# Python: $PYTHON, else the repo's .venv if its torch sees a GPU, else python3 (carried wheels in .whl/ are
# installed into /tmp first, as bench/gpu.sh does).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${1:-${OUT:-runs/gpu-smoke}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 1
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=python3
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlmtune-site \
    .whl/*.whl || echo "[gpu_smoke] warning: the wheel install failed; going on with the machine's packages"
  export PYTHONPATH=/tmp/vlmtune-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$NGPU" -lt 1 ]; then echo "[gpu_smoke] no CUDA GPU visible; nothing to do"; exit 1; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 8 | tee "$OUT_DIR/nvidia-smi.txt"

# Inputs: the synthetic model (tiny, or SMOKE_SIZE=mid) and synthetic receipts, written once.
"$PY" - "$OUT_DIR" "${SMOKE_SIZE:-tiny}" <<'PY' || exit 1
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
for MODE in full lora; do
  RUN=$OUT_DIR/run-$MODE
  rm -rf "$RUN"
  EXTRA=()
  [ "$MODE" = lora ] && EXTRA=(peft.r=16 peft.dropout=0.0)
  START=$(date +%s)
  timeout 600 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" -m vlmtune finetune \
    output_dir="$RUN" model.name_or_path="$OUT_DIR/model-${SMOKE_SIZE:-tiny}" \
    data.train.source="$OUT_DIR/data" data.train.format=cord_v2 \
    train.max_steps=10 train.micro_batch_size=2 train.global_batch_size=$((2 * NGPU)) train.lr=1e-4 \
    train.max_length=512 train.log_every_steps=1 distributed.strategy=fsdp2 \
    distributed.activation_checkpointing=language "${EXTRA[@]}" 2>&1 | tee "$OUT_DIR/log-$MODE.txt"
  RC=${PIPESTATUS[0]}
  echo "[gpu_smoke] $MODE: exit $RC in $(( $(date +%s) - START )) s on $NGPU GPU(s)"
  [ "$RC" -eq 0 ] && [ -d "$RUN/final" ] || STATUS=1
  "$PY" - "$RUN" <<'PY'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
steps = [r for r in rows if "loss" in r and "step" in r]
for r in steps:
    print(f"  step {r['step']:3d}  loss {r['loss']:.4f}  grad_norm {r['grad_norm']:.3f}  tok/s {r['tokens_per_s']:.0f}")
final = run / "final"
print(f"  final folder: {sorted(p.name for p in final.iterdir()) if final.is_dir() else 'MISSING'}")
PY
done
echo "[gpu_smoke] $([ $STATUS -eq 0 ] && echo OK || echo FAILED); logs in $OUT_DIR"
exit $STATUS
