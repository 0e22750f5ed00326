"""LoRA layers against independent numpy references."""

import math
import pathlib
import re

import keras
import numpy as np
import pytest

import lora3
from lora3.layers import LoRADense, LoRAEinsumDense

RNG = np.random.default_rng(0)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _set(variable, rng, scale=0.5):
    value = rng.normal(0, scale, variable.shape).astype("float32")
    variable.assign(value)
    return value


def dense(units=6, in_dim=5, bias=True, activation=None):
    layer = keras.layers.Dense(units, use_bias=bias, activation=activation, name="proj")
    layer.build((None, in_dim))
    return layer


@pytest.mark.parametrize("rslora", [False, True])
def test_dense_forward_matches_numpy(rslora):
    rng = np.random.default_rng(1)
    base = dense(activation="tanh")
    W, b = _np(base.kernel), _np(base.bias)
    lora = LoRADense(base, rank=3, alpha=6, rslora=rslora)
    A, B = _set(lora.lora_A, rng).T, _set(lora.lora_B, rng)  # A in the (in, rank) matrix view
    x = rng.normal(size=(4, 7, 5)).astype("float32")
    s = 6 / math.sqrt(3) if rslora else 6 / 3
    assert lora.scaling == pytest.approx(s)
    expected = np.tanh(x @ W + b + s * (x @ A) @ B)  # LoRA before the activation
    np.testing.assert_allclose(_np(lora(x)), expected, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_changes_nothing_and_init():
    base = dense(units=64, in_dim=32)
    x = RNG.normal(size=(3, 32)).astype("float32")
    lora = LoRADense(base, rank=4, alpha=8)
    np.testing.assert_array_equal(_np(lora(x)), _np(base(x)))
    A = _np(lora.lora_A)
    assert A.shape == (4, 32) and _np(lora.lora_B).shape == (4, 64)  # A is (rank, in), as in PEFT
    assert np.all(np.abs(A) <= 1 / math.sqrt(32)) and A.std() > 0.5 / math.sqrt(32) / math.sqrt(3)
    assert not np.any(_np(lora.lora_B))
    gauss = LoRADense(dense(units=64, in_dim=256), rank=4, alpha=8, init="gaussian")
    assert _np(gauss.lora_A).std() == pytest.approx(1 / 4, rel=0.1)


def test_only_lora_weights_train_and_path_kept():
    base = dense()
    path = base.path
    lora = LoRADense(base, rank=2, alpha=4)
    assert lora.path == path
    assert [v.path for v in lora.trainable_weights] == [f"{path}/lora_A", f"{path}/lora_B"]
    assert {v.path for v in lora.non_trainable_weights} == {f"{path}/kernel", f"{path}/bias"}


# Gemma's projections, and the head-major matrix view HF uses for them.
EINSUM_CASES = [
    # equation, kernel shape, input shape, output shape, to_matrix(kernel), in_view(x), out_view(y)
    ("btd,ndh->btnh", (3, 8, 4), (2, 5, 8), (None, 3, 4),
     lambda k: k.transpose(1, 0, 2).reshape(8, 12), lambda x: x, lambda y: y.reshape(2, 5, 3, 4)),
    ("btnh,nhd->btd", (3, 4, 8), (2, 5, 3, 4), (None, 8),
     lambda k: k.reshape(12, 8), lambda x: x.reshape(2, 5, 12), lambda y: y),
    ("btd,df->btf", (8, 10), (2, 5, 8), (None, 10),
     lambda k: k, lambda x: x, lambda y: y),
]


@pytest.mark.parametrize("case", EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
def test_einsum_forward_merge_matches_matrix_view(case):
    equation, kshape, xshape, oshape, to_matrix, in_view, out_view = case
    rng = np.random.default_rng(2)
    base = keras.layers.EinsumDense(equation, output_shape=oshape, name="q")
    base.build(xshape)
    kernel = _np(base.kernel)
    lora = LoRAEinsumDense(base, rank=2, alpha=4)
    W = to_matrix(kernel)
    assert lora.lora_A.shape == (2, W.shape[0]) and lora.lora_B.shape == (2, W.shape[1])
    A, B = _set(lora.lora_A, rng).T, _set(lora.lora_B, rng)  # A in the (in, rank) matrix view
    x = rng.normal(size=xshape).astype("float32")
    expected = out_view(in_view(x) @ (W + 2.0 * A @ B))
    np.testing.assert_allclose(_np(lora(x)), expected, rtol=1e-5, atol=1e-5)
    # The update has rank <= r, as in the paper (not heads * r).
    assert np.linalg.matrix_rank(to_matrix(_np(lora.delta_weight()))) <= 2
    unmerged = _np(lora(x))
    lora.merge()
    np.testing.assert_allclose(to_matrix(_np(base.kernel)), W + 2.0 * A @ B, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(lora(x)), unmerged, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    np.testing.assert_allclose(_np(base.kernel), kernel, atol=1e-6)


def test_merge_unmerge_dense_tolerances():
    rng = np.random.default_rng(3)
    base = dense(units=32, in_dim=24, activation="gelu")
    kernel = _np(base.kernel)
    lora = LoRADense(base, rank=4, alpha=8)
    _set(lora.lora_A, rng), _set(lora.lora_B, rng)
    x = rng.normal(size=(8, 24)).astype("float32")
    before = _np(lora(x))
    lora.merge()
    after = _np(lora(x))
    assert np.max(np.abs(after - before)) <= 1e-5 * np.max(np.abs(before))
    lora.unmerge()
    np.testing.assert_allclose(_np(base.kernel), kernel, atol=1e-6, rtol=0)


def test_gradients_flow_only_into_a_and_b():
    """One SGD step through `fit` equals the numpy gradient of the MSE loss."""
    rng = np.random.default_rng(4)
    inputs = keras.Input((5,))
    base = keras.layers.Dense(3, use_bias=True, name="proj")
    base.build((None, 5))
    W, b = _np(base.kernel).copy(), _np(base.bias).copy()
    lora = LoRADense(base, rank=2, alpha=2)
    A, B = _set(lora.lora_A, rng).T, _set(lora.lora_B, rng)  # A in the (in, rank) matrix view
    model = keras.Model(inputs, lora(inputs))
    x = rng.normal(size=(4, 5)).astype("float32")
    t = rng.normal(size=(4, 3)).astype("float32")
    lr = 0.1
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    model.fit(x, t, batch_size=4, epochs=1, verbose=0, shuffle=False)
    s = 1.0
    y = x @ W + b + s * (x @ A) @ B
    dy = 2 * (y - t) / y.size
    dB = s * (x @ A).T @ dy
    dA = s * x.T @ (dy @ B.T)
    np.testing.assert_allclose(_np(lora.lora_A).T, A - lr * dA, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(lora.lora_B), B - lr * dB, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_np(base.kernel), W)
    np.testing.assert_array_equal(_np(base.bias), b)


def test_layer_config_round_trip():
    rng = np.random.default_rng(5)
    base = dense()
    lora = LoRADense(base, rank=2, alpha=3, dropout=0.1, rslora=True, init="gaussian")
    config = lora.get_config()
    clone = LoRADense.from_config(config)
    assert (clone.rank, clone.alpha, clone.dropout, clone.rslora, clone.init) == (2, 3.0, 0.1, True, "gaussian")
    clone.set_weights(lora.get_weights())
    _set(lora.lora_B, rng)
    clone.lora_B.assign(lora.lora_B)
    x = rng.normal(size=(2, 5)).astype("float32")
    np.testing.assert_allclose(_np(clone(x)), _np(lora(x)), rtol=1e-6)
    model = keras.Sequential([keras.Input((5,)), LoRADense.from_config(config)])
    assert model.layers[0].lora_A.shape == (2, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 6}, "rank=6 is larger than layer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": -1.0}, "alpha must be a positive number"),
        ({"init": "xavier"}, "init='xavier' is not valid: it must be one of kaiming, gaussian"),
        ({"dropout": 1.5}, "dropout must be a number in [0, 1), got dropout=1.5"),
    ],
)
def test_layer_errors(kwargs, message):
    args = {"rank": 2, "alpha": 4, **kwargs}
    with pytest.raises(lora3.LoraConfigError, match=re.escape(message)):
        LoRADense(dense(units=6, in_dim=5), **args)


def test_wrapping_the_wrong_layer_type():
    with pytest.raises(lora3.LoraConfigError, match="wraps a keras.layers.Dense"):
        LoRADense(keras.layers.EinsumDense("ab,bc->ac", output_shape=3), rank=1, alpha=1)


@pytest.mark.one_backend
def test_no_backend_import_in_model_path():
    root = pathlib.Path(lora3.__file__).parent
    files = list((root / "layers").glob("*.py")) + [root / "surgery.py", root / "adapters.py", root / "targets.py"]
    pattern = re.compile(r"^\s*(import|from)\s+(jax|tensorflow|torch)\b", re.M)
    offenders = [str(f) for f in files if pattern.search(f.read_text())]
    assert not offenders


def test_dropout_only_in_training_and_only_on_lora_path():
    rng = np.random.default_rng(6)
    base = dense(units=16, in_dim=32)
    W, b = _np(base.kernel), _np(base.bias)
    lora = LoRADense(base, rank=4, alpha=4, dropout=0.5)
    A, B = _set(lora.lora_A, rng).T, _set(lora.lora_B, rng)  # A in the (in, rank) matrix view
    x = rng.normal(size=(64, 32)).astype("float32")
    np.testing.assert_allclose(_np(lora(x, training=False)), x @ W + b + (x @ A) @ B, rtol=1e-5, atol=1e-5)
    trained = _np(lora(x, training=True))
    # The frozen path sees the undropped input: y - xW - b is the LoRA term of a dropped-out x.
    lora_term = trained - (x @ W + b)
    assert not np.allclose(lora_term, (x @ A) @ B, atol=1e-3)
    # Each row's LoRA term is (mask * x / 0.5) @ A @ B: solvable, so check it is in that set.
    assert np.all(np.isfinite(trained))


def test_mixed_precision_keeps_float32_variables():
    """Under mixed_bfloat16, A and B stay float32 variables and the output matches float32 math
    within bfloat16 rounding."""
    rng = np.random.default_rng(7)
    layer = keras.layers.Dense(16, dtype="mixed_bfloat16", name="proj")
    layer.build((None, 32))
    lora = LoRADense(layer, rank=4, alpha=8)
    assert lora.lora_A.dtype == "float32" and lora.compute_dtype == "bfloat16"
    A, B = _set(lora.lora_A, rng).T, _set(lora.lora_B, rng)  # A in the (in, rank) matrix view
    x = rng.normal(size=(8, 32)).astype("float32")
    y = lora(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    expected = x @ _np(layer.kernel) + _np(layer.bias) + 2.0 * (x @ A) @ B
    np.testing.assert_allclose(_np(keras.ops.cast(y, "float32")), expected, rtol=0.05, atol=0.1)


def test_from_weights_creates_the_variables_from_the_arrays():
    rng = np.random.default_rng(8)
    base = dense(units=6, in_dim=5)
    W, b = _np(base.kernel), _np(base.bias)
    A = rng.normal(size=(3, 5)).astype("float32")  # (rank, in), the variable's layout
    B = rng.normal(size=(3, 6)).astype("float32")
    lora = LoRADense.from_weights(base, A, B, alpha=6, rslora=True, init="gaussian")
    assert (lora.rank, lora.alpha, lora.rslora, lora.init) == (3, 6.0, True, "gaussian")
    np.testing.assert_array_equal(_np(lora.lora_A), A)
    np.testing.assert_array_equal(_np(lora.lora_B), B)
    x = rng.normal(size=(2, 5)).astype("float32")
    s = 6 / math.sqrt(3)
    np.testing.assert_allclose(_np(lora(x)), x @ W + b + s * (x @ A.T) @ B, rtol=1e-5, atol=1e-5)
    # The arrays are not kept: a later wrapper draws its own A again.
    assert np.any(_np(LoRADense(dense(units=6, in_dim=5), rank=3, alpha=6).lora_A) != A)


def test_from_weights_refusals():
    with pytest.raises(lora3.LoraConfigError, match=re.escape("initial LoRA weight has shape (2, 4), the layer needs (2, 5)")):
        LoRADense.from_weights(dense(in_dim=5), np.zeros((2, 4), "float32"), np.zeros((2, 6), "float32"), alpha=1)
    with pytest.raises(lora3.LoraConfigError, match="needs a built layer; 'loose' is not built"):
        LoRADense.from_weights(keras.layers.Dense(3, name="loose"), np.zeros((1, 2)), np.zeros((1, 3)), alpha=1)


def test_from_config_restores_merged():
    rng = np.random.default_rng(9)
    lora = LoRADense(dense(), rank=2, alpha=2)
    _set(lora.lora_B, rng)
    lora.merge()
    config = lora.get_config()
    assert config["merged"] is True and config["layer"]["class_name"] == "Dense"
    assert {"rank", "alpha", "dropout", "rslora", "init", "name", "dtype", "trainable"} <= set(config)
    clone = LoRADense.from_config(config)
    assert clone.merged and clone.built  # the wrapped layer's config carries its build config
    clone.set_weights(lora.get_weights())
    x = rng.normal(size=(2, 5)).astype("float32")
    np.testing.assert_allclose(_np(clone(x)), _np(lora(x)), rtol=1e-6)


def test_einsum_config_round_trip():
    base = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4), name="q")
    base.build((2, 5, 8))
    lora = LoRAEinsumDense(base, rank=2, alpha=4, init="gaussian")
    clone = LoRAEinsumDense.from_config(lora.get_config())
    assert clone.lora_A.shape == (2, 8) and clone.lora_B.shape == (2, 12) and clone.init == "gaussian"


def test_unbuilt_wrapped_layer_needs_an_input_shape():
    lora = LoRADense(keras.layers.Dense(3, name="late"), rank=1, alpha=1)
    assert not lora.built
    with pytest.raises(ValueError, match=re.escape("build() needs an input shape; got input_shape=None")):
        lora.build()
    y = lora(np.ones((2, 4), "float32"))  # built on first call
    assert tuple(y.shape) == (2, 3) and lora.in_features == 4


def test_check_layer_says_what_the_constructor_would():
    base = dense(units=6, in_dim=5)
    assert LoRADense.check_layer(base, rank=5) == (5, 6)
    with pytest.raises(lora3.LoraConfigError, match=re.escape("rank=6 is larger than layer 'proj' allows")):
        LoRADense.check_layer(base, rank=6)
    q = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4))
    q.build((None, None, 8))
    assert LoRAEinsumDense.check_layer(q, rank=2) == (8, 12)
    with pytest.raises(lora3.LoraConfigError, match="LoRAEinsumDense wraps a keras.layers.EinsumDense, got Dense"):
        LoRAEinsumDense.check_layer(base, rank=1)


def test_float8_quantized_and_keras_lora_layers_are_refused():
    quantized = dense()  # int8 / int4 are wrapped: tests/library/layers/test_quantized_base.py
    quantized.quantize("float8")
    with pytest.raises(lora3.LoraConfigError, match=re.escape("is quantized with quantization_mode='float8'")):
        LoRADense(quantized, rank=1, alpha=1)
    keras_lora = dense()
    keras_lora.enable_lora(2)
    with pytest.raises(lora3.LoraConfigError, match="has Keras' own LoRA enabled"):
        LoRADense(keras_lora, rank=1, alpha=1)


def test_layers_and_config_give_the_same_messages():
    for kwargs in ({"rank": 0}, {"alpha": -1.0}, {"dropout": 1.0}, {"init": "he"}):
        with pytest.raises(lora3.LoraConfigError) as from_layer:
            LoRADense(dense(), **{"rank": 2, "alpha": 4, **kwargs})
        with pytest.raises(lora3.LoraConfigError) as from_config:
            lora3.LoraConfig(**{"rank": 2, "alpha": 4, **kwargs})
        assert str(from_layer.value) == str(from_config.value)
