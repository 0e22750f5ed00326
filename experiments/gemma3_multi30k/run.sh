#!/usr/bin/env bash
# The Gemma 3 270M study, one arm after another, each in its own run directory under runs/.
# An arm whose metrics.json exists is skipped, so the study runs in pieces (rerun this script).
#   nice -n 10 bash experiments/gemma3_multi30k/run.sh          # all arms
#   ARMS="frozen lora_all_linear_r8" bash experiments/gemma3_multi30k/run.sh
#   ARMS="lora_all_linear_r8_int8 lora_all_linear_r8_int4" bash ...   # the same arm on Keras-quantized bases
# Then: python scripts/report.py experiments/gemma3_multi30k/runs --out experiments/gemma3_multi30k
set -u
cd "$(dirname "$0")/../.."
export TF_CPP_MIN_LOG_LEVEL=2 WANDB_ERROR_REPORTING=false WANDB_SILENT=true
RUNS=experiments/gemma3_multi30k/runs
COMMON="experiment=gemma3_multi30k backend=${BACKEND:-jax} trainer.keep_checkpoints=1"
declare -A ARGS=(
  [frozen]="lora=none"
  [lora_all_linear_r8]="targets=all_linear rank=8 alpha=16 eval.before=false"
  [full]="lora=full trainer.lr=5e-5 eval.before=false"
  [lora_qv_r8]="targets=qv rank=8 alpha=16 eval.before=false"
  [lora_all_linear_r1]="targets=all_linear rank=1 alpha=2 eval.before=false"
  [lora_all_linear_r32]="targets=all_linear rank=32 alpha=64 eval.before=false"
  [lora_all_linear_r8_int8]="targets=all_linear rank=8 alpha=16 eval.before=false lora.base_quantization=int8"
  [lora_all_linear_r8_int4]="targets=all_linear rank=8 alpha=16 eval.before=false lora.base_quantization=int4"
)
for arm in ${ARMS:-frozen lora_all_linear_r8 full lora_qv_r8 lora_all_linear_r1 lora_all_linear_r32}; do
  dir=$RUNS/$arm
  if [ -f "$dir/metrics.json" ]; then echo "[study] $arm: done, skipped"; continue; fi
  rm -rf "$dir"
  echo "[study] $arm: python -m lora3.run $COMMON ${ARGS[$arm]}"
  python -m lora3.run $COMMON ${ARGS[$arm]} hydra.run.dir="$dir" > "$RUNS/$arm.log" 2>&1
  rc=$?
  rm -rf "$dir/checkpoints" "$dir/model"   # checkpoints and the full model (1 GB) are not kept
  echo "[study] $arm: exit $rc"
done
