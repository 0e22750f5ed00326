#!/usr/bin/env bash
# The rank x alpha study on the default task, in pieces (priority order), each one multirun under
# multirun/rank_alpha/<piece>/; then scripts/report.py collects every piece that exists.
#   bash experiments/rank_alpha/run.sh                 # every piece
#   PIECES="a8 base" bash experiments/rank_alpha/run.sh    # some pieces
# CACHE=<dir> puts the trained base there (default: lora3's per-user cache). NICE=19 by default.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=${ROOT:-multirun/rank_alpha}
CACHE_ARG=${CACHE:+cache_dir=$CACHE}
export WANDB_ERROR_REPORTING=false TF_CPP_MIN_LOG_LEVEL=2
R=1,2,4,8,16,32,64
A2R="alpha='\${mul:\${rank},2}'"
AR="alpha='\${rank}'"
piece() {  # piece <name> <overrides...>
  local name=$1; shift
  [ -e "$ROOT/$name/sweep_summary.json" ] && { echo "piece $name: done already"; return; }
  echo "=== piece $name: $* ($(date +%T))"
  /usr/bin/time -f "piece $name: wall %e s, cpu %U+%S s" nice -n ${NICE:-19} \
    python -m lora3.run -m experiment=rank_alpha $CACHE_ARG "hydra.sweep.dir=$ROOT/$name" "$@" \
    > "$ROOT/$name.log" 2>&1
  grep -E "^\[lora3\] sweep|^  [0-9]+ |piece $name" "$ROOT/$name.log"
}
mkdir -p "$ROOT"
for p in ${PIECES:-a8 base qv8 all2r qv2r seeds all16 rs16 allr lr}; do
  case $p in
    a8)    piece a8 targets=all_linear rank=8 alpha=16 ;;                         # the headline cell
    base)  piece base lora=full,none ;;                                            # baselines, seed 0
    qv8)   piece qv8 targets=qv rank=8 alpha=16 ;;                                 # the default run's cell
    all2r) piece all2r targets=all_linear rank=1,2,4,16,32,64 "$A2R" ;;            # all_linear alpha=2r
    qv2r)  piece qv2r targets=qv rank=1,2,4,16,32,64 "$A2R" ;;                     # qv alpha=2r (8 is qv8)
    allr)  piece allr targets=all_linear rank=1,2,4,8,32,64 "$AR" ;;               # alpha=r (16 is in all16)
    all16) piece all16 targets=all_linear rank=1,2,4,16,32,64 alpha=16 ;;          # alpha=16 (8 is a8)
    rs16)  piece rs16 targets=all_linear rank=$R alpha=16 lora.rslora=true ;;      # rsLoRA, alpha=16
    seeds) piece seeds_lora targets=all_linear rank=8 alpha=16 seed=1,2
           piece seeds_base lora=full,none seed=1,2 ;;
    lr)    piece lr_full lora=full trainer.lr=1e-3                                # is full FT's lr fair?
           piece lr_lora targets=all_linear rank=8 alpha=16 trainer.lr=1e-2 ;;     # is LoRA's?
  esac
done
python scripts/report.py "$ROOT" --out experiments/rank_alpha
