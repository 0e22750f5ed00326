#!/usr/bin/env bash
# GPU call B (one NVIDIA H200), independent of call A: Gemma 3 270M LoRA tokens/s with lora3's
# completion loss and with keras-hub's full-logit loss (its architecture with random weights: the GGUF
# does not travel), and trainer.remat's memory (XLA's temporary buffers of the compiled step, which on
# CPU do not shrink) against the step time, at the tutorial recipe's batch and the Gemma 3 study's.
#   run: OUT=$OUT bash experiments/benchmarks/gpu_run5.sh   (about 5 minutes)
set -u
. "$(dirname "$0")/gpu_env.sh"
timeout 200 python3 -m lora3.bench --model gemma3_270m_arch --backends jax \
  --setups lora3-all_linear,lora3-all_linear-full_logits --batch 64 --dtype mixed_bfloat16 --warmup 3 --steps 10 \
  --ranks '' --inference-backends '' --timeout 150 --out "$OUT/bench_gemma3_gpu.json" 2>&1 | grep -v -i warn | tail -14
timeout 120 python3 experiments/benchmarks/remat_memory.py --model t5_base --steps 5 \
  --out "$OUT/remat_t5_base_gpu.json" 2>&1 | grep -v -i warn | grep -A3 -E '"ratios"|"loss"'
timeout 120 python3 experiments/benchmarks/remat_memory.py --model gemma3_270m_arch --steps 5 \
  --out "$OUT/remat_gemma3_gpu.json" 2>&1 | grep -v -i warn | grep -A3 -E '"ratios"|"loss"'
