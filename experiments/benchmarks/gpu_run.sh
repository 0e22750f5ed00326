#!/usr/bin/env bash
# The GPU runs checked in under experiments/benchmarks/ and experiments/tutorial/:
# FLAN-T5-base, mixed bfloat16, batch 32 x (512 encoder + 512 decoder) tokens, JAX, one process per
# setup; then the tutorial recipe's memory (fp32, batch 16 x 128+128, r=4 all_linear) vs full.
# Usage: OUT=<dir> bash experiments/benchmarks/gpu_run.sh   (wheels for keras/keras-hub in .whl/ if missing)
set -u
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, keras, keras_hub; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__, 'keras_hub', keras_hub.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m lora3.bench --model base --backends jax --setups full,lora3-qv,lora3-all_linear,forward-only \
  --batch 32 --enc-len 512 --dec-len 512 --dtype mixed_bfloat16 --peak-tflops 989 --repeats 1 --warmup 3 --steps 10 \
  --ranks "" --inference-backends "" --generate-rounds 0 --timeout 120 --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
for mode in "" "--full"; do
  timeout 60 python3 experiments/tutorial/memory_probe.py --run 5 $mode 2>&1 | tail -3 | tee -a "$OUT/tutorial_memory.log"
done
