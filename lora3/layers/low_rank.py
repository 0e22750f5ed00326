"""The two rank-r products of a LoRA layer, `x @ A.T` and `h @ B`, with gradients XLA runs fast.

Two of a LoRA layer's products contract the rank r: `h @ B` forward and the input gradient
`g @ A` backward. They write a full-size `(tokens, features)` array from a thin one, and XLA's
CPU backend runs them as dots (YNNPACK) at a small fraction of the machine's speed: in the
FLAN-T5-small bench step a `(256, 8) @ (8, 1024)` product took 0.6 ms, longer than the
frozen `(256, 512) @ (512, 1024)` product beside it, and these products were most of what a
LoRA step spent above the frozen-model floor. Written as r broadcast multiply-adds they are
one elementwise fusion that runs at memory speed.

Autodiff of that sum would be r reductions over the output gradient, each reading it again
(10x slower than the dots), so both products carry their gradient (`keras.ops.custom_gradient`):
the products contracting the tokens or the features (`g @ B.T`, `h.T @ g`, `g.T @ x`) stay
dots, the one contracting the rank is the same unrolled sum. One layer's forward and backward
at r = 8 (`experiments/benchmarks/lora_products.py`, JAX CPU) add 143 us to the frozen
layer's 1,732 us (dots: 293) at 256 tokens, 512 -> 1024, and 106 against 281 us at
512 tokens, 512 -> 384. Values are those of the plain matmuls up to float rounding
(`tests/library/layers/test_low_rank.py` checks both paths against numpy). Above
`UNROLL_MAX_RANK` both are plain matmuls. Measured on CPU only: on a GPU the same code runs
(there both forms are bound by writing the full-size output), not yet timed.

Example:
>>> import numpy as np
>>> from lora3.layers.low_rank import expand, project
>>> x = np.ones((3, 5), "float32"); a = np.ones((2, 5), "float32"); b = np.ones((2, 4), "float32")
>>> np.asarray(expand(project(x, a), b)).tolist()[0]
[10.0, 10.0, 10.0, 10.0]
"""

from keras import ops

# Largest rank whose products are unrolled. r <= 8 wins on every layer shape measured and in the whole
# FLAN-T5-small step. r=16 won on one layer shape and lost on another (512 tokens 512->1024: +1190
# against +1761 us over the frozen layer; 256 tokens: +447 against +378), and in the whole step it cost
# 1.17x the r=4 step against 1.09x as dots (`python -m lora3.bench --ranks ...`): from r=16 on the
# dots stay.
UNROLL_MAX_RANK = 8


def _sum_of_outer_products(thin, wide):
    """`thin @ wide` for `thin: (tokens, r)`, `wide: (r, features)`, as r broadcast multiply-adds
    accumulated in float32 (as a matmul accumulates), in `thin`'s dtype."""
    thin32, wide32 = ops.cast(thin, "float32"), ops.cast(wide, "float32")
    total = ops.multiply(thin32[:, 0:1], wide32[0:1, :])
    for r in range(1, int(wide.shape[0])):
        total = ops.add(total, ops.multiply(thin32[:, r : r + 1], wide32[r : r + 1, :]))
    return ops.cast(total, thin.dtype)


def _upstream(args, upstream):
    # keras' portable signature: JAX and TensorFlow pass the output gradient positionally,
    # PyTorch as `upstream`.
    return upstream if upstream is not None else args[0]


@ops.custom_gradient
def _expand_unrolled(hidden, b):
    def grad(*args, upstream=None):
        g = _upstream(args, upstream)
        return ops.matmul(g, ops.transpose(b)), ops.matmul(ops.transpose(hidden), g)

    return _sum_of_outer_products(hidden, b), grad


@ops.custom_gradient
def _project_unrolled(x, a):
    def grad(*args, upstream=None):
        g = _upstream(args, upstream)
        # dA = g.T @ x comes out (rank, in), A's own layout: the fast one for this contraction.
        return _sum_of_outer_products(g, a), ops.matmul(ops.transpose(g), x)

    return ops.matmul(x, ops.transpose(a)), grad


def expand(hidden, b):
    """`hidden @ b`: `(tokens, r) @ (r, out) -> (tokens, out)`, `b` cast to `hidden`'s dtype."""
    b = ops.cast(b, hidden.dtype)
    if int(b.shape[0]) > UNROLL_MAX_RANK:
        return ops.matmul(hidden, b)
    return _expand_unrolled(hidden, b)


def project(x, a):
    """`x @ a.T`: `(tokens, in) @ (r, in).T -> (tokens, r)`, `a` cast to `x`'s dtype."""
    a = ops.cast(a, x.dtype)
    if int(a.shape[0]) > UNROLL_MAX_RANK:
        return ops.matmul(x, ops.transpose(a))
    return _project_unrolled(x, a)
