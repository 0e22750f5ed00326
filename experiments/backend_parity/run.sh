#!/usr/bin/env bash
# Backend parity: the default run on JAX and on TensorFlow with the same seed, then each adapter
# evaluated on the other backend. Run from the repo root:  bash experiments/backend_parity/run.sh
# Writes runs/{jax,tensorflow}/ (metrics.json, samples.jsonl, adapter/), cross_*.json, parity.md, parity.png.
# CACHE: where the trained base is cached (default: lora3's per-user cache); both runs share it.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/backend_parity
CACHE_ARG=${CACHE:+cache_dir=$CACHE}
export WANDB_ERROR_REPORTING=false TF_CPP_MIN_LOG_LEVEL=2
rm -rf $HERE/runs
for b in jax tensorflow; do
  /usr/bin/time -f "$b run: wall %e s, cpu %U+%S s" \
    nice -n ${NICE:-0} python -m lora3.run backend=$b seed=0 wandb.mode=disabled $CACHE_ARG hydra.run.dir=$HERE/runs/$b \
    > $HERE/runs_$b.log 2>&1 || { tail -30 $HERE/runs_$b.log; exit 1; }
  tail -1 $HERE/runs_$b.log
done
KERAS_BACKEND=tensorflow nice -n ${NICE:-0} python $HERE/cross_eval.py $HERE/runs/jax --out $HERE/cross_jax_adapter_on_tensorflow.json
KERAS_BACKEND=jax nice -n ${NICE:-0} python $HERE/cross_eval.py $HERE/runs/tensorflow --out $HERE/cross_tensorflow_adapter_on_jax.json
python $HERE/compare.py $HERE
