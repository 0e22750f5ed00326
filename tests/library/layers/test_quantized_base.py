"""LoRA over Keras' int8 / int4 quantized Dense and EinsumDense (QLoRA-style), against numpy.

The references quantize in numpy as Keras documents it (absmax per output channel for the kernel,
per token for int8 inputs), check that Keras' stored int8 kernel is that, and compute the product,
the LoRA term and the gradients of A, B and the input by hand. Then: training (fit) on a tiny
quantized Gemma, `model.quantize` on a model already wrapped, adapters moving between an int8 and a
float base, `merge_and_unload` refused, DoRA on an int8 base, float8 refused.
"""

import json

import keras
import numpy as np
import pytest

import lora3
from lora3.errors import LoraConfigError
from lora3.layers import LoRADense, LoRAEinsumDense
from tests.library.test_dora import grads_of
from tests.tiny import gemma_backbone, gemma_inputs, randomize_lora

np_ = keras.ops.convert_to_numpy
EPS = 1e-7  # keras.backend.epsilon(), in Keras' absmax quantizer


@pytest.fixture(autouse=True)
def _seeded():
    """Keras' initialisers seeded per test: a value on a rounding boundary fails every run or none."""
    keras.utils.set_random_seed(0)


def absmax(x, axis, top, bottom=None):
    """numpy absmax quantization: (integer values in [bottom, top], scale) with x ~= q / scale."""
    scale = top / (np.abs(x).max(axis=axis, keepdims=True) + EPS)
    return np.clip(np.round(x * scale), -top if bottom is None else bottom, top), scale


def set_random(wrapper, rng):
    a = rng.normal(0, 0.3, wrapper.lora_A.shape).astype("float32")
    b = rng.normal(0, 0.3, wrapper.lora_B.shape).astype("float32")
    wrapper.lora_A.assign(a)
    wrapper.lora_B.assign(b)
    return a.astype("float64"), b.astype("float64")


# Each case: the layer, its input, and the numpy pieces: the kernel's reduced axis, the equation.
def _dense():
    layer = keras.layers.Dense(6, name="proj")
    layer.build((None, 5))
    return layer, (3, 4, 5), 0, "btd,df->btf"


def _query():
    layer = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4), name="query")
    layer.build((None, None, 8))
    return layer, (2, 3, 8), 1, "btd,ndh->btnh"


@pytest.mark.parametrize("make", [_dense, _query], ids=["Dense", "EinsumDense"])
def test_int8_base_output_and_gradients_match_numpy(make):
    rng = np.random.default_rng(0)
    layer, x_shape, reduced, equation = make()
    W = np_(layer.kernel).astype("float64")
    bias = np_(layer.bias).astype("float64") if getattr(layer, "bias", None) is not None else 0.0
    layer.quantize("int8")
    Wq, w_scale = absmax(W, reduced, 127)
    np.testing.assert_array_equal(np_(layer._kernel), Wq)  # Keras stores what numpy's absmax gives
    wrapper = (LoRADense if isinstance(layer, keras.layers.Dense) else LoRAEinsumDense)(layer, rank=2, alpha=6)
    assert wrapper.dtype_policy.name == "float32" and wrapper.lora_A.dtype == "float32"
    assert [v.path for v in wrapper.trainable_weights] == [f"{layer.name}/lora_A", f"{layer.name}/lora_B"]
    A, B = set_random(wrapper, rng)
    x = rng.normal(size=x_shape).astype("float32")
    y = np_(wrapper(x))
    G = rng.normal(size=y.shape).astype("float64")

    # Keras' int8 compute: inputs quantized per token (absmax over the contracted dim), int8 x int8.
    xq, x_scale = absmax(x.astype("float64"), -1, 127)
    w_scale_out = w_scale.reshape(G.shape[2:])  # one scale per output channel
    base = np.einsum(equation, xq, Wq) / (x_scale.reshape(x_shape[:2] + (1,) * (G.ndim - 2)) * w_scale_out)
    x2, G2 = x.reshape(-1, A.shape[1]).astype("float64"), G.reshape(-1, B.shape[1])
    s = 3.0
    hidden = x2 @ A.T
    expected = base + bias + (s * hidden @ B).reshape(G.shape)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)

    # Gradients: B and A by hand; the input's through the dequantized kernel (Keras' custom gradient).
    xv = keras.Variable(x)
    # (a tensor read from xv: the layer sees a tensor, as in a model; TF refuses a variable in a custom gradient)
    g_a, g_b, g_x = grads_of(lambda: keras.ops.sum(wrapper(keras.ops.add(xv, 0.0)) * G), [wrapper.lora_A, wrapper.lora_B, xv])
    np.testing.assert_allclose(g_b, s * hidden.T @ G2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_a, s * (G2 @ B.T).T @ x2, rtol=1e-4, atol=1e-4)
    W_deq = Wq / w_scale
    out_letters = equation.split("->")[1][2:]
    kernel_letters = equation.split(",")[1].split("->")[0]
    g_base = np.einsum(f"bt{out_letters},{kernel_letters}->btd", G, W_deq)
    np.testing.assert_allclose(g_x, g_base + (s * (G2 @ B.T) @ A).reshape(x_shape), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_size", [-1, 4])
def test_int4_dense_base_matches_numpy(block_size):
    rng = np.random.default_rng(1)
    layer, x_shape, _, _ = _dense()
    W = np_(layer.kernel).astype("float64")
    # Keras' default int4 is sub-channel (block_size=128); -1 is per channel.
    layer.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=block_size))
    wrapper = LoRADense(layer, rank=2, alpha=2)
    A, B = set_random(wrapper, rng)
    x = rng.normal(size=x_shape).astype("float64")
    delta = ((x.reshape(-1, 5) @ A.T) @ B).reshape(x_shape[:2] + (6,))
    bias = np_(layer.bias).astype("float64")
    if block_size == -1:
        # Per channel, weights only: x @ (q / scale), q in [-8, 7].
        q, scale = absmax(W, 0, 7, bottom=-8)
        np.testing.assert_allclose(np_(wrapper.kernel_matrix()), q / scale, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np_(wrapper(x.astype("float32"))), x @ (q / scale) + bias + delta,
                                   rtol=1e-4, atol=1e-4)
    else:
        # Sub-channel (asymmetric, a zero point per group of 4 rows): lora3's dequantized kernel is the
        # kernel Keras' own layer computes with (its product with the identity, bias taken off).
        keras_kernel = np_(layer(np.eye(5, dtype="float32"))) - bias
        np.testing.assert_allclose(np_(wrapper.kernel_matrix()), keras_kernel, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np_(wrapper(x.astype("float32"))),
                                   x @ np_(wrapper.kernel_matrix()) + bias + delta, rtol=1e-4, atol=1e-4)


def test_int4_einsum_dense_runs_close_to_float():
    layer, x_shape, _, _ = _query()
    x = np.random.default_rng(2).normal(size=x_shape).astype("float32")
    y_float = np_(layer(x))
    layer.quantize("int4")
    wrapper = LoRAEinsumDense(layer, rank=2, alpha=4)
    y = np_(wrapper(x))  # B is zero: the quantized base alone
    assert y.shape == y_float.shape and 0 < np.abs(y - y_float).max() < 0.25 * np.abs(y_float).max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_tied_head_passes_the_true_gradient(mode):
    # Keras' quantized reverse projection rounds its inputs to int8 with no custom gradient, so the
    # hidden states' gradient came through the activation scale alone (Gemma 3 int8 LoRA diverged).
    # After differentiable_head: logits h @ (q / scale).T and d CE / d h = (softmax - onehot) @ (q / scale).
    from lora3.layers.quantized import differentiable_head

    rng = np.random.default_rng(3)
    emb = keras.layers.ReversibleEmbedding(40, 8, name="token_embedding")
    emb.build((None,))
    E = np_(emb.embeddings).astype("float64")
    config = keras.quantizers.Int4QuantizationConfig(block_size=-1) if mode == "int4" else None
    emb.quantize(mode, config=config)
    q, scale = absmax(E, -1, 127) if mode == "int8" else absmax(E, -1, 7, bottom=-8)
    kernel = q / scale  # (vocabulary, hidden): per-token-row absmax, as Keras quantizes an embedding
    # int8: Keras quantizes the head's inputs, lora3 takes that off (once); Keras' int4 is weight-only already.
    assert differentiable_head(emb) == (mode == "int8") and not differentiable_head(emb)
    h = keras.Variable(rng.normal(size=(6, 8)).astype("float32"))
    labels = rng.integers(0, 40, size=6)

    def loss():
        z = emb(h, reverse=True)
        return keras.ops.sum(keras.ops.logsumexp(z, axis=-1)
                             - keras.ops.take_along_axis(z, keras.ops.convert_to_tensor(labels)[:, None], axis=-1)[:, 0])

    z = np_(h).astype("float64") @ kernel.T
    np.testing.assert_allclose(np_(emb(h, reverse=True)), z, rtol=1e-5, atol=1e-5)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(6), labels] -= 1.0
    (dh,) = grads_of(loss, [h])
    np.testing.assert_allclose(dh, p @ kernel, rtol=1e-4, atol=1e-5)


def test_apply_lora_makes_a_quantized_models_head_differentiable():
    backbone = gemma_backbone(layers=1)
    backbone.quantize("int8")
    head = backbone.get_layer("token_embedding")
    assert head.inputs_quantizer is not None  # Keras' own: int8 inputs, no gradient through them
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, targets="qv"))
    assert head.inputs_quantizer is None and head.quantization_mode == "int8"


def test_training_on_an_int8_gemma_updates_only_lora():
    keras.utils.set_random_seed(0)
    backbone = gemma_backbone(layers=1)
    backbone.quantize("int8")  # Dense/EinsumDense and the (tied) token embedding, as Keras does
    assert backbone.get_layer("token_embedding").quantization_mode == "int8"
    report = lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, targets="all_linear"))
    assert {w.base_quantization for w in lora3.lora_layers(backbone)} == {"int8"}
    trainable = backbone.trainable_weights
    assert {v.dtype for v in trainable} == {"float32"} and report.trainable_params == report.lora_params
    frozen = {v.path: np_(v).copy() for v in backbone.weights if not v.trainable}
    inputs = gemma_inputs()
    target = np.random.default_rng(1).normal(size=np_(backbone(inputs)).shape).astype("float32")

    def loss():
        return keras.ops.mean(keras.ops.square(backbone(inputs) - target))

    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(trainable)
    losses = []
    for _ in range(4):  # Adam steps on the gradients of A and B alone
        losses.append(float(np_(loss())))
        optimizer.apply(grads_of(loss, trainable), trainable)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert all(np.any(np_(w.lora_B)) for w in lora3.lora_layers(backbone))
    for v in backbone.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(np_(v), frozen[v.path], err_msg=v.path)


def _block_model():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.proj = keras.layers.Dense(8, activation="gelu", name="proj")
            self.heads = keras.layers.EinsumDense("bd,dnh->bnh", output_shape=(2, 4), name="heads")

        def call(self, x):
            return self.heads(self.proj(x))

    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    return keras.Model(inputs, Block(name="block")(inputs))


def test_quantizing_a_wrapped_model_equals_wrapping_a_quantized_one():
    x = np.random.default_rng(4).normal(size=(3, 6)).astype("float32")
    first = _block_model()  # quantize, then wrap (what lora.base_quantization does)
    second = _block_model()  # wrap, then model.quantize: Keras quantizes the wrapped layers in place
    second.set_weights(first.get_weights())
    first.quantize("int8")
    config = lora3.LoraConfig(rank=2, targets=r"block/.*", dropout=0.1)
    lora3.apply_lora(first, config)
    lora3.apply_lora(second, config)
    randomize_lora(first, seed=5, scale=0.3)
    randomize_lora(second, seed=5, scale=0.3)
    float_out = np_(second(x))
    second.quantize("int8")
    assert [w.base_quantization for w in lora3.lora_layers(second)] == ["int8", "int8"]
    np.testing.assert_allclose(np_(second(x)), np_(first(x)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np_(second(x)), float_out, atol=1e-6)  # the quantized base computes


def _int8_and_float_gemma():
    keras.utils.set_random_seed(6)
    float_bb = gemma_backbone(layers=1)
    int8_bb = gemma_backbone(layers=1)
    int8_bb.set_weights(float_bb.get_weights())
    int8_bb.quantize("int8")
    return int8_bb, float_bb


def test_an_adapter_moves_between_int8_and_float_bases(tmp_path):
    int8_bb, float_bb = _int8_and_float_gemma()
    inputs = gemma_inputs()
    config = lora3.LoraConfig(rank=2, targets="all_linear")
    lora3.apply_lora(int8_bb, config)
    randomize_lora(int8_bb, seed=7, scale=0.3)
    lora3.save_adapter(int8_bb, tmp_path / "from_int8")
    lora3.load_adapter(float_bb, tmp_path / "from_int8")
    for q, f in zip(lora3.lora_layers(int8_bb), lora3.lora_layers(float_bb)):
        assert q.path == f.path and f.base_quantization is None
        np.testing.assert_array_equal(np_(q.lora_A), np_(f.lora_A))
        np.testing.assert_array_equal(np_(q.lora_B), np_(f.lora_B))
    y_int8 = np_(int8_bb(inputs))
    # ... and back: the float base's adapter loads onto a fresh int8 base; the same files either way.
    lora3.save_adapter(float_bb, tmp_path / "from_float")
    fresh_int8, _ = _int8_and_float_gemma()
    lora3.load_adapter(fresh_int8, tmp_path / "from_float")
    np.testing.assert_array_equal(np_(fresh_int8(inputs)), y_int8)
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("from_int8", "from_float")]
    assert configs[0] == configs[1]
    assert sorted(p.name for p in (tmp_path / "from_int8").iterdir()) == sorted(
        p.name for p in (tmp_path / "from_float").iterdir())


def test_merge_and_unload_refuses_a_quantized_base_and_changes_nothing():
    int8_bb, _ = _int8_and_float_gemma()
    lora3.apply_lora(int8_bb, lora3.LoraConfig(rank=2, targets="qv"))
    randomize_lora(int8_bb, seed=8)
    inputs = gemma_inputs()
    before = np_(int8_bb(inputs))
    with pytest.raises(LoraConfigError, match=r"int8-quantized kernel .* load it onto the float base"):
        lora3.merge_and_unload(int8_bb)
    assert lora3.lora_layers(int8_bb) and not any(w.merged for w in lora3.lora_layers(int8_bb))
    np.testing.assert_array_equal(np_(int8_bb(inputs)), before)
    with pytest.raises(LoraConfigError, match="would re-quantize"):
        lora3.lora_layers(int8_bb)[0].merge()


def test_dora_on_an_int8_base_matches_numpy():
    rng = np.random.default_rng(9)
    layer, x_shape, _, _ = _dense()
    W = np_(layer.kernel).astype("float64")
    bias = np_(layer.bias).astype("float64")
    layer.quantize("int8")
    wrapper = LoRADense(layer, rank=2, alpha=4, dora=True)
    Wq, w_scale = absmax(W, 0, 127)
    W_deq = Wq / w_scale
    # The magnitude starts at the dequantized kernel's column norms (PEFT dequantizes for DoRA too).
    np.testing.assert_allclose(np_(wrapper.lora_magnitude), np.linalg.norm(W_deq, axis=0), rtol=1e-5)
    A, B = set_random(wrapper, rng)
    m = np_(wrapper.lora_magnitude).astype("float64") * rng.uniform(0.5, 1.5, 6)
    wrapper.lora_magnitude.assign(m.astype("float32"))
    x = rng.normal(size=x_shape).astype("float32")
    xq, x_scale = absmax(x.astype("float64"), -1, 127)
    base = (xq @ Wq) / (x_scale * w_scale)  # the int8 product
    scale = m / np.linalg.norm(W_deq + 2.0 * A.T @ B, axis=0)
    expected = base + bias + (scale - 1) * base + scale * (2.0 * (x @ A.T) @ B)
    np.testing.assert_allclose(np_(wrapper(x)), expected, rtol=1e-4, atol=1e-4)


def test_float8_layers_are_refused_naming_the_modes_lora3_wraps():
    layer, _, _, _ = _dense()
    layer.quantize("float8")
    with pytest.raises(LoraConfigError, match=r"quantization_mode='float8'; lora3 adapts float layers and Keras' int8 and int4"):
        LoRADense(layer, rank=1, alpha=1)
