"""The rank-r products of one LoRA layer, forward and backward, on JAX CPU: dots against lora3's
unrolled products with their own gradients (`lora3.layers.low_rank`).

    KERAS_BACKEND=jax python experiments/benchmarks/lora_products.py

Each variant is the gradient of `sum(tanh(x @ W + s * (x @ A.T) @ B))` with respect to A, B and x,
12 layers in one jitted function (so no per-call dispatch is timed); medians of 30 calls, per layer,
and what each adds to the frozen layer's forward + input gradient (`floor`). Shapes are FLAN-T5-small
FFN and attention layers at the bench batch (512 encoder / 256 decoder tokens), r = 8 and 64.
"""
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lora3.layers.low_rank import _sum_of_outer_products, expand, project  # noqa: E402

LAYERS = 12


def median_us(f, n=30):
    f()
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def gradient_of(delta, W):
    def loss(A, B, x):
        total = 0.0
        for i in range(LAYERS):
            xi = x * (1 + 0.01 * i)
            y = xi @ W if delta is None else xi @ W + delta(xi, A, B)
            total = total + jnp.sum(jnp.tanh(y))
        return total

    return jax.jit(jax.grad(loss, argnums=(2,) if delta is None else (0, 1, 2)))


rng = np.random.default_rng(0)
for tokens, d_in, d_out, rank in [(256, 512, 1024, 8), (512, 512, 384, 8), (512, 512, 1024, 8), (512, 512, 512, 64)]:
    x = jnp.asarray(rng.normal(size=(tokens, d_in)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(d_in, d_out)) / 30, jnp.float32)
    A = jnp.asarray(rng.normal(size=(rank, d_in)) / 30, jnp.float32)
    B = jnp.asarray(rng.normal(size=(rank, d_out)) / 30, jnp.float32)
    variants = {
        "floor (frozen layer)": gradient_of(None, W),
        "dots": gradient_of(lambda x, A, B: (x @ A.T) @ B, W),
        "unrolled, autodiff": gradient_of(lambda x, A, B: _sum_of_outer_products(x @ A.T, B), W),
        "lora3 low_rank": gradient_of(lambda x, A, B: expand(project(x, A), B), W),
    }
    print(f"tokens {tokens}, {d_in} -> {d_out}, r = {rank}")
    floor = None
    for name, f in variants.items():
        t = median_us(lambda: jax.block_until_ready(f(A, B, x))) / LAYERS
        floor = floor or t
        print(f"  {name:22s} {t:8.1f} us/layer  +{t - floor:7.1f}")
