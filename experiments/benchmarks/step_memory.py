"""XLA's memory analysis of the compiled JAX train step, per bench setup (FLAN-T5-small, batch 8, 64+32).

    KERAS_BACKEND=jax python experiments/benchmarks/step_memory.py full frozen-floor lora3-all_linear keras-all_linear

Arguments are what the step reads (weights, optimizer state); temporaries are XLA's buffers for
activations kept for the backward pass and intermediates, beyond the outputs. MiB.
"""
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

from lora3.bench.setups import keras_worker as kw  # noqa: E402
from lora3.bench.setups.common import MODELS, batch_arrays  # noqa: E402

for setup in sys.argv[1:] or ["full", "frozen-floor", "lora3-all_linear", "keras-all_linear"]:
    spec = dict(model="small", batch=8, enc_len=64, dec_len=32, seed=0, rank=8, alpha=16.0, setup=setup)
    x = batch_arrays(spec, MODELS["small"]["vocabulary_size"])
    y = x.pop("labels")
    model = kw.build_model(spec)
    kw.prepare(spec, model)
    kw.compile_model(model, spec)
    model.train_on_batch(x, y)  # builds the optimizer state
    mem = kw.lower_train_step(model, x, y).compile().memory_analysis()
    print(f"{setup:18s} arguments {mem.argument_size_in_bytes / 2**20:7.1f}  "
          f"temporaries {mem.temp_size_in_bytes / 2**20:7.1f}")
