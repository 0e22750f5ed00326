#!/usr/bin/env bash
# The LoRA-variants study on the default task, in pieces, each one multirun under multirun/variants/<piece>/
# (a piece whose sweep_summary.json exists is skipped); then scripts/report.py collects every piece.
#   bash experiments/variants/run.sh                    # every piece
#   PIECES="plain dora" bash experiments/variants/run.sh
# Every LoRA piece: all_linear, rank 4 and 16, alpha = 2r, seeds 0 and 1. CACHE=<dir> puts the trained
# base there (default: lora3's per-user cache). NICE=19 by default.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-multirun/variants}
CACHE_ARG=${CACHE:+cache_dir=$CACHE}
export WANDB_ERROR_REPORTING=false TF_CPP_MIN_LOG_LEVEL=2
GRID=(rank=4,16 "alpha='\${mul:\${rank},2}'" seed=0,1)
piece() {  # piece <name> <overrides...>
  local name=$1; shift
  [ -e "$ROOT/$name/sweep_summary.json" ] && { echo "piece $name: done already"; return; }
  echo "=== piece $name: $* ($(date +%T))"
  /usr/bin/time -f "piece $name: wall %e s, cpu %U+%S s" nice -n ${NICE:-19} \
    python -m lora3.run -m experiment=variants $CACHE_ARG "hydra.sweep.dir=$ROOT/$name" "$@" \
    > "$ROOT/$name.log" 2>&1
  grep -E "^\[lora3\] sweep|^  [0-9]+ |piece $name" "$ROOT/$name.log"
}
mkdir -p "$ROOT"
for p in ${PIECES:-plain refs dora pissa loraplus rslora olora}; do
  case $p in
    plain)    piece plain "${GRID[@]}" ;;                                   # LoRA, kaiming A, B = 0
    refs)     piece refs lora=full,none seed=0,1 ;;                         # full fine-tuning, frozen base
    dora)     piece dora "${GRID[@]}" lora.dora=true ;;                     # DoRA (Liu et al. 2024)
    pissa)    piece pissa "${GRID[@]}" lora.init=pissa ;;                   # PiSSA (Meng et al. 2024)
    loraplus) piece loraplus "${GRID[@]}" trainer.lora_plus_ratio=16 ;;     # LoRA+ (Hayou et al. 2024), B's lr x16
    rslora)   piece rslora "${GRID[@]}" lora.rslora=true ;;                 # rsLoRA: alpha/sqrt(r)
    olora)    piece olora "${GRID[@]}" lora.init=olora ;;                   # OLoRA (Büyükakyüz 2024), extra
  esac
done
python scripts/report.py "$ROOT" --out experiments/variants
