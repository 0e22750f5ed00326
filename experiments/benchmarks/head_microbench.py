"""The LM head of Gemma 3 alone: loss + hidden-state gradient of 288 tokens (the Gemma bench's
completion positions) over a 262,144 x 640 tied embedding, jitted on JAX, alternated in one process.

    KERAS_BACKEND=jax python experiments/benchmarks/head_microbench.py

Prints the median seconds and XLA's temporary memory of: plain logits at the 288 positions, plain
logits at all 744 positions (what keras-hub's full-logit loss pays), and lora3's chunked loss.
"""
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lora3.run.completion import chunked_token_loss  # noqa: E402

VOCAB, DIM, TOKENS, ALL_TOKENS, ROUNDS = 262_144, 640, 288, 744, 6
rng = np.random.default_rng(0)
kernel = jnp.asarray(rng.normal(size=(VOCAB, DIM)).astype("float32") * 0.02)


def plain(h, w, y):
    z = h @ w.T
    return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0])


def chunked(h, w, y):
    return jnp.mean(chunked_token_loss(h, y, w, kernel_grad=False)[0])


def inputs(n):
    return (jnp.asarray(rng.normal(size=(n, DIM)).astype("float32")), kernel,
            jnp.asarray(rng.integers(0, VOCAB, n).astype("int32")))


cases = {"plain logits, 288 tokens": (plain, inputs(TOKENS)), "plain logits, 744 tokens": (plain, inputs(ALL_TOKENS)),
         "lora3 chunked loss, 288": (chunked, inputs(TOKENS))}
compiled, times = {}, {name: [] for name in cases}
for name, (fn, args) in cases.items():
    f = jax.jit(jax.value_and_grad(fn))
    jax.block_until_ready(f(*args))  # compile + first run, not timed
    compiled[name] = (f, args, f.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20)
for _ in range(ROUNDS):
    for name, (f, args, _) in compiled.items():
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times[name].append(time.perf_counter() - t)
for name, (_, _, temp) in compiled.items():
    print(f"{name:26s} median {np.median(times[name]):.3f} s   XLA temp {temp:6.0f} MiB   "
          f"steps {np.round(times[name], 2).tolist()}")
