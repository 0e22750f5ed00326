#!/usr/bin/env bash
# Third GPU call (issue 18, prepared, not yet run: no GPU was lent since it was written).
# trainer.remat's memory claim: XLA:CPU does not turn recomputation into lower memory
# (remat_xla_cpu_control.py: 369 -> 520 MB on CPU), so it is measured here: the control, then
# FLAN-T5-base at the tutorial recipe's batch (16 x 128+128), blocks remat vs none, in one process.
# Gemma 3 270M is not in this script: its GGUF (PyPI package) is larger than what travels to the device.
#   run: OUT=$OUT bash experiments/benchmarks/gpu_run3.sh   (about 6 minutes)
set -u
. "$(dirname "$0")/gpu_env.sh"
timeout 60 python3 experiments/benchmarks/remat_xla_cpu_control.py 2>&1 | grep -v -i warn | tee "$OUT/remat_control.log"
timeout 240 python3 experiments/benchmarks/remat_memory.py --model t5_base --steps 5 \
  --out "$OUT/remat_t5_base_gpu.json" 2>&1 | grep -v -i warn | tail -12 | tee "$OUT/remat_t5_base_gpu.log"
# The same pair through the bench (its remat setup; peak device memory, both modes, one process each).
timeout 300 python3 -m lora3.bench --model base --batch 16 --enc-len 128 --dec-len 128 --backends jax \
  --setups lora3-all_linear,lora3-all_linear-remat --ranks '' --inference-backends '' --steps 5 \
  --out "$OUT/bench_remat_t5_base_gpu.json" 2>&1 | grep -v -i warn | tail -25 | tee "$OUT/bench_remat_t5_base_gpu.log"
