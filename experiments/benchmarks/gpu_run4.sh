#!/usr/bin/env bash
# GPU call A (one NVIDIA H200): where a FLAN-T5-base training step's time goes, and what fixes it.
#   1. the relative-position-bias gradient alone (a scatter-add of 262,144 rows into 32), f32 / bf16 / one-hot;
#   2. bench setups side by side in one process (bf16, 32 x 512+512, r=8): forward, LoRA qv / all_linear,
#      full fine-tuning, full with the bias tables frozen, the LoRA setups with lora3.fuse_attention
#      (cuDNN flash attention) and with plain-matmul LoRA products; kernel profiles of three of them.
#   run: OUT=$OUT bash experiments/benchmarks/gpu_run4.sh   (about 6 minutes)
set -u
. "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, keras, keras_hub; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'keras_hub', keras_hub.__version__)"
timeout 60 python3 experiments/benchmarks/gpu/scatter_micro.py --out "$OUT/scatter_micro.json" 2>&1 | grep -v -i warn
timeout 420 python3 experiments/benchmarks/gpu/t5_step_profile.py --out "$OUT/t5_step_profile.json" --save-traces "$OUT" \
  --variants qv,all_linear,forward,full,full+frozen_bias,qv+fused,all_linear+fused,all_linear+fused+dots \
  --trace qv,full,all_linear+fused 2>&1 | grep -v -i -E "warn|^I0000|^W0000"
