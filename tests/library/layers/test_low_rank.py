"""The rank-r products with their own gradients (`lora3.layers.low_rank`) against numpy, through a
jitted training step, on both sides of `UNROLL_MAX_RANK`."""

import keras
import numpy as np
import pytest

from lora3.layers import LoRADense
from lora3.layers.low_rank import UNROLL_MAX_RANK, expand, project


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("rank", [1, 4, UNROLL_MAX_RANK, UNROLL_MAX_RANK + 1, 2 * UNROLL_MAX_RANK])
def test_products_and_their_gradients_match_numpy(rank):
    """One SGD step of a LoRA layer on 3-D inputs (the products run on the flattened tokens) moves A and
    B by the numpy gradient of the MSE loss, and the output is the numpy forward."""
    rng = np.random.default_rng(rank)
    base = keras.layers.Dense(40, name="proj")
    base.build((None, None, 48))
    W, b = _np(base.kernel).copy(), _np(base.bias).copy()
    lora = LoRADense(base, rank=rank, alpha=2 * rank)
    A = rng.normal(0, 0.3, (48, rank)).astype("float32")  # the (in, rank) matrix view
    B = rng.normal(0, 0.3, (rank, 40)).astype("float32")
    lora.lora_A.assign(A.T)
    lora.lora_B.assign(B)
    inputs = keras.Input((5, 48))
    model = keras.Model(inputs, lora(inputs))
    x = rng.normal(size=(3, 5, 48)).astype("float32")
    t = rng.normal(size=(3, 5, 40)).astype("float32")
    s = 2.0
    y = x @ W + b + s * (x @ A) @ B
    np.testing.assert_allclose(_np(model(x)), y, rtol=1e-5, atol=1e-5)
    lr = 0.1
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    model.fit(x, t, batch_size=3, epochs=1, verbose=0, shuffle=False)
    x2, dy = x.reshape(-1, 48), (2 * (y - t) / y.size).reshape(-1, 40)
    dB = s * (x2 @ A).T @ dy
    dA = s * x2.T @ (dy @ B.T)
    np.testing.assert_allclose(_np(lora.lora_A).T, A - lr * dA, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(lora.lora_B), B - lr * dB, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_np(base.kernel), W)


def test_unrolled_products_accumulate_in_float32_under_bfloat16():
    """bfloat16 operands: the sum over the rank is taken in float32, as a matmul accumulates. 1 plus r - 1
    terms of 2**-9 is above 1 by more than half a bfloat16 step there (2**-8); summed in bfloat16 each term
    is under half a step of 1 and the sum stays 1.0."""
    h = keras.ops.ones((4, UNROLL_MAX_RANK), "bfloat16")
    b = np.full((UNROLL_MAX_RANK, 3), 2.0**-9, "float32")
    b[0] = 1.0
    out = expand(h, keras.ops.cast(b, "bfloat16"))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    exact = np.float32(1 + (UNROLL_MAX_RANK - 1) * 2.0**-9)
    rounded = _np(keras.ops.cast(keras.ops.cast(np.full((4, 3), exact), "bfloat16"), "float32"))
    assert rounded[0, 0] > 1.0
    np.testing.assert_array_equal(_np(keras.ops.cast(out, "float32")), rounded)
    hidden = project(keras.ops.ones((4, UNROLL_MAX_RANK), "bfloat16"), keras.ops.cast(b.T, "bfloat16"))
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16" and tuple(hidden.shape) == (4, 3)
