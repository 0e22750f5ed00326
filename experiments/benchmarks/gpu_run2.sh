#!/usr/bin/env bash
# Second GPU call: executed FLOPs (XLA cost analysis of the compiled step) for the fast setups, for MFU,
# and the tutorial recipe's measured memory. Same set-up as gpu_run.sh.
set -u
. "$(dirname "$0")/gpu_env.sh"
timeout 200 python3 -m lora3.bench --model base --backends jax --setups lora3-qv,lora3-all_linear,forward-only \
  --batch 32 --enc-len 512 --dec-len 512 --dtype mixed_bfloat16 --peak-tflops 989 --repeats 1 --warmup 3 --steps 10 \
  --ranks "" --inference-backends "" --generate-rounds 0 --flops compiled --timeout 100 --out "$OUT/bench_gpu_flops.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_gpu_flops.log"
timeout 70 python3 experiments/tutorial/memory_probe.py --run 5 --json "$OUT/tutorial_lora.json" 2>&1 | grep -v -i warn | tail -3
timeout 70 python3 experiments/tutorial/memory_probe.py --run 5 --full --json "$OUT/tutorial_full.json" 2>&1 | grep -v -i warn | tail -3
