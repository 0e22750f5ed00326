"""The gradient of T5's relative-position-bias lookup alone, on this device (JAX): `take` of a
(32 buckets, 12 heads) table at (512, 512) bucket ids, as keras-hub's `compute_bias` does, summed
against a random cotangent; its gradient is a scatter-add of 262,144 rows into 32. Timed in float32
and bfloat16 (the table's dtype under `mixed_bfloat16`), and as a one-hot matmul (the same gradient
as a matrix product), median of 20 calls after 3.

    KERAS_BACKEND=jax python experiments/benchmarks/gpu/scatter_micro.py --out scatter_micro.json
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def buckets(q, k, num_buckets=32, max_distance=128, bidirectional=True):
    """T5's bucket ids (as keras-hub's `_relative_position_bucket`), numpy."""
    rel = np.arange(k)[None, :] - np.arange(q)[:, None]
    out = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = num_buckets // 2
    large = exact + (np.log(np.maximum(rel, 1) / exact) / np.log(max_distance / exact) * (num_buckets - exact)).astype(int)
    large = np.minimum(large, num_buckets - 1)
    return (out + np.where(rel < exact, rel, large)).astype("int32")


def timed(fn, *args, reps=20):
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    ids = jnp.asarray(buckets(a.length, a.length))
    rng = np.random.default_rng(0)
    out = {"device": str(jax.devices()[0]), "length": a.length, "heads": a.heads, "ms": {}}
    ids_np = np.asarray(ids)
    for dtype in ("float32", "bfloat16"):
        table = jnp.asarray(rng.normal(size=(32, a.heads)), dtype)
        g_np = rng.normal(size=(a.length, a.length, a.heads)).astype("float32")
        g = jnp.asarray(g_np, dtype)
        reference = np.zeros((32, a.heads))  # the exact gradient (float64), from the cotangent as cast
        np.add.at(reference, ids_np, np.asarray(g.astype("float32"), "float64"))
        # ids and g are arguments, not constants: XLA would fold the whole gradient at compile time.
        take_grad = jax.jit(jax.grad(lambda t, i, g: jnp.sum(jnp.take(t, i, axis=0).astype("float32") * g)))
        onehot_grad = jax.jit(jax.grad(lambda t, i, g: jnp.sum(
            jnp.einsum("qkb,bh->qkh", jax.nn.one_hot(i, 32, dtype=t.dtype), t).astype("float32") * g)))
        for name, fn in (("take_grad", take_grad), ("onehot_grad", onehot_grad)):
            err = np.abs(np.asarray(fn(table, ids, g), "float64") - reference).max() / np.abs(reference).max()
            out["ms"][f"{name}_{dtype}"] = timed(fn, table, ids, g) * 1e3
            out[f"max_rel_err_{name}_{dtype}"] = float(err)
        print(dtype, {k: round(v, 3) for k, v in out["ms"].items() if dtype in k},
              {k: f"{v:.1e}" for k, v in out.items() if k.startswith("max_rel") and dtype in k}, flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
