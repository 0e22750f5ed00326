"""`lora3.fuse_attention` on keras-hub's T5: the fused op against a numpy attention, and a LoRA-wrapped
T5's outputs and training step against the unfused model (both backends: the test command runs both)."""

import keras
import keras_hub
import numpy as np

import lora3
import lora3.fused_attention as fused_attention


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _backbone(dropout=0.0):
    keras.utils.set_random_seed(0)
    return keras_hub.models.T5Backbone(vocabulary_size=60, num_layers=2, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, key_value_dim=8, dropout=dropout)


def _batch():
    rng = np.random.default_rng(0)
    return {
        "encoder_token_ids": rng.integers(1, 60, (3, 7)).astype("int32"),
        "encoder_padding_mask": np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], "int32"),
        "decoder_token_ids": rng.integers(1, 60, (3, 5)).astype("int32"),
        "decoder_padding_mask": np.array([[1] * 5, [1] * 4 + [0], [1] * 2 + [0] * 3], "int32"),
    }


def _count_fused_calls(monkeypatch):
    calls = []
    real = keras.ops.dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_attention.ops, "dot_product_attention", counted)
    return calls


def test_the_fused_layer_is_numpy_attention_with_relative_bias_and_padding_mask():
    layer = _backbone().get_layer("transformer_encoder_layer_0").self_attention
    assert fused_attention.fuse_attention(_wrap(layer)) == [layer.path]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    mask = np.ones((2, 1, 6), "int32")
    mask[1, :, 4:] = 0
    out, bias, _ = layer(x, mask=mask)
    heads = lambda t: t.reshape(2, 6, 2, 8)  # noqa: E731
    q, k, v = (heads(x @ _np(p.kernel)) for p in (layer.query_projector, layer.key_projector, layer.value_projector))
    rel = _np(layer.compute_bias(6, 6))  # (1, heads, q, k): keras-hub's buckets, looked up
    scores = np.einsum("bqnd,bknd->bnqk", q, k) + rel + (1.0 - mask[:, None]) * -1e9  # T5: no 1/sqrt(d)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bnqk,bknd->bqnd", weights, v).reshape(2, 6, 16) @ _np(layer.output_projector.kernel)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(bias), rel + (1.0 - mask[:, None]) * -1e9, rtol=1e-6)


def _wrap(layer):
    """A model holding one layer, for `fuse_attention` (which walks a model's layers)."""
    holder = keras.layers.Layer()
    holder.inner = layer
    return holder


def test_fused_lora_t5_gives_the_same_outputs_and_training_step(monkeypatch):
    x = _batch()
    plain, fused = _backbone(), _backbone()
    for m in (plain, fused):
        lora3.apply_lora(m, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear"))
        rng = np.random.default_rng(2)  # the same factors in both, B non-zero: the adapters take part
        for w in lora3.lora_layers(m):
            w.lora_A.assign(rng.normal(0, 0.3, w.lora_A.shape).astype("float32"))
            w.lora_B.assign(rng.normal(0, 0.1, w.lora_B.shape).astype("float32"))
    paths = lora3.fuse_attention(fused)
    assert len(paths) == 6 and lora3.fuse_attention(fused) == []  # 2 encoder + 2x2 decoder; idempotent
    calls = _count_fused_calls(monkeypatch)
    a, b = plain(x), fused(x)
    assert len(calls) == 6
    for key in a:
        np.testing.assert_allclose(_np(b[key]), _np(a[key]), rtol=1e-5, atol=1e-5)

    def sgd_step(m):
        out = keras.layers.Dense(1, kernel_initializer="ones", trainable=False)
        inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in x}
        model = keras.Model(inputs, out(m(inputs)["decoder_sequence_output"]))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=True)
        target = np.ones((3, 5, 1), "float32")
        model.fit(x, target, batch_size=3, epochs=1, verbose=0, shuffle=False)
        return {v.path: _np(v) for v in m.trainable_weights}

    before = {v.path: _np(v) for v in plain.trainable_weights}
    after_plain, after_fused = sgd_step(plain), sgd_step(fused)
    moved = [p for p in before if not np.allclose(after_plain[p], before[p])]
    assert len(moved) == len(before)  # every LoRA factor got a gradient
    # SGD: the update is the gradient. Equal within float32 rounding: JAX's attention backward sums in
    # another order, which leaves an absolute error of about 1e-6 on every factor (3e-5 of the largest
    # update measured), so the bound is relative to the model's largest update.
    scale = max(np.abs(after_plain[p] - before[p]).max() for p in before)
    for p in before:
        want, got = after_plain[p] - before[p], after_fused[p] - before[p]
        assert np.abs(got - want).max() <= 2e-4 * scale, (p, np.abs(got - want).max() / scale)


def test_cached_decoding_and_attention_dropout_run_keras_hubs_own_code(monkeypatch):
    backbone = _backbone(dropout=0.1)
    lora3.fuse_attention(backbone)
    layer = backbone.get_layer("transformer_decoder_layer_0").self_attention
    calls = _count_fused_calls(monkeypatch)
    x = np.ones((1, 1, 16), "float32")
    cache = np.zeros((1, 2, 4, 2, 8), "float32")
    layer(x, cache=cache, cache_update_index=0)
    layer(x, training=True)  # attention dropout: the fused op has none
    assert calls == []
    layer(x, training=False)
    assert len(calls) == 1


def test_a_model_without_t5_attention_is_left_alone():
    keras.utils.set_random_seed(0)
    gemma = keras_hub.models.GemmaBackbone(vocabulary_size=50, num_layers=1, num_query_heads=2,
                                           num_key_value_heads=1, hidden_dim=16, intermediate_dim=32, head_dim=8)
    assert lora3.fuse_attention(gemma) == []


def test_the_app_fuses_t5_attention_when_asked(run_cli, lora3_cache, tmp_path):
    """trainer.fused_attention=true: the smoke job (T5, one layer of each stack: 3 attention layers) trains,
    evaluates and generates with the fused layers; the key is off by default."""
    r = run_cli("experiment=smoke", "trainer.fused_attention=true", f"cache_dir={lora3_cache}",
                f"hydra.run.dir={tmp_path}", timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "trainer.fused_attention=true: 3 attention layers fused" in r.stdout + r.stderr
    assert "val/bleu" in r.stdout
