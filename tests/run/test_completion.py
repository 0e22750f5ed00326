"""The chunked completion loss (lora3/run/completion.py) against keras-hub's full-logit loss.

The reference is the plain path a user of keras-hub writes: the `CausalLM`'s logits at every
position, Keras' `SparseCategoricalCrossentropy` with the completion's weights, differentiated by
the backend's own autodiff. The chunked loss must give the same loss and the same gradients
(1e-5 relative) with one block of tokens and with several (a ragged last one), with the vocabulary
in chunks (a ragged last one), frozen and trainable embeddings, with and without a final logit soft
cap.
"""

import keras
import numpy as np
import pytest

import lora3
from lora3.run.completion import CompletionLoss, chunk_sizes
from tests.library.test_dora import grads_of, rel_grad
from tests.tiny import backend, randomize_lora

VOCAB = 61


def gemma(kind, soft_cap):
    import keras_hub

    keras.utils.set_random_seed(0)
    common = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
                  intermediate_dim=32, head_dim=4, final_logit_soft_cap=soft_cap)
    if kind == "gemma3":
        backbone = keras_hub.models.Gemma3Backbone(image_size=None, **common)
        return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    backbone = keras_hub.models.GemmaBackbone(**common)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def batch(b=3, t=9, k=5, seed=0):
    """Rows of different prompt lengths; each row's completion positions are contiguous (as packed),
    and the last rows' buffers end in zero-weight padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (b, t)).astype("int32")
    mask = np.ones((b, t), "int32")
    positions = np.zeros((b, k), "int32")
    weights = np.zeros((b, k), "float32")
    for i, (first, n) in enumerate([(2, 5), (3, 4), (4, 2)][:b]):
        positions[i, :n] = np.arange(first, first + n)
        weights[i, :n] = 1.0
    labels = rng.integers(0, VOCAB, (b, k)).astype("int32")
    x = {"token_ids": ids, "padding_mask": mask, "loss_positions": positions, "loss_labels": labels}
    return x, labels, weights


def full_logit_loss(lm, x, labels, weights):
    """keras-hub's path: logits at every position, Keras' sparse cross-entropy, weights on the completion."""
    t = x["token_ids"].shape[1]
    all_labels = np.zeros(x["token_ids"].shape, "int32")
    all_weights = np.zeros(x["token_ids"].shape, "float32")
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if weights[i, j] > 0:
                assert x["loss_positions"][i, j] < t
                all_labels[i, x["loss_positions"][i, j]] = labels[i, j]
                all_weights[i, x["loss_positions"][i, j]] = weights[i, j]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
    return lambda: loss(all_labels, lm({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]},
                                       training=True), sample_weight=all_weights)


def loss_and_grads(loss_fn, variables):
    """(loss, gradients) as numpy; on JAX jitted (op-by-op autodiff of a model is slow)."""
    if backend() != "jax":
        return float(keras.ops.convert_to_numpy(loss_fn())), grads_of(loss_fn, variables)
    import jax

    def f(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return loss_fn()

    loss, grads = jax.jit(jax.value_and_grad(f))([v.value for v in variables])
    return float(loss), [np.asarray(g) for g in grads]


def chunked_loss(lm, x, weights, chunk):
    view = CompletionLoss(lm, chunk_tokens=chunk[0], chunk_vocab=chunk[1])
    weights = keras.ops.convert_to_tensor(weights)
    return lambda: keras.ops.sum(view(x, training=True)[..., 0] * weights) / keras.ops.sum(weights)


@pytest.mark.parametrize("kind,soft_cap,finetune", [
    ("gemma", None, "lora"),
    ("gemma3", None, "full"),
    ("gemma3", 5.0, "lora"),
])
def test_chunked_loss_and_gradients_equal_the_full_logit_loss(kind, soft_cap, finetune):
    lm = gemma(kind, soft_cap)
    if finetune == "lora":
        lora3.apply_lora(lm, lora3.LoraConfig(rank=2, targets="all_linear"))
        randomize_lora(lm, scale=0.3)  # B != 0: the LoRA gradients are not trivially those of B = 0
    x, labels, weights = batch()
    variables = list(lm.trainable_variables)
    emb = lm.backbone.token_embedding.embeddings
    assert any(v is emb for v in variables) == (finetune == "full")
    ref_fn = full_logit_loss(lm, x, labels, weights)
    ref_loss, ref_grads = loss_and_grads(ref_fn, variables)
    # 15 positions: blocks of 4 leave a ragged last block of 3; 61 entries in chunks of 16 a tail of 13
    for chunk in ((4, 16), (None, 16), (4, None)):
        loss, grads = loss_and_grads(chunked_loss(lm, x, weights, chunk), variables)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for v, g, r in zip(variables, grads, ref_grads):
            assert np.abs(r).max() > 0, v.path  # every compared gradient is a real one
            assert rel_grad(g, r) < 1e-5, (chunk, v.path, rel_grad(g, r))


def test_evaluation_forward_gives_the_loss_and_accuracy_of_the_full_logits():
    lm = gemma("gemma3", None)
    x, labels, weights = batch()
    out = keras.ops.convert_to_numpy(CompletionLoss(lm, chunk_tokens=4, chunk_vocab=16)(x, training=False))
    logits = keras.ops.convert_to_numpy(lm({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}))
    z = np.take_along_axis(logits, x["loss_positions"][..., None], axis=1).astype("float64")
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ce = lse - np.take_along_axis(z, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(out[..., 0], ce, rtol=1e-5)
    np.testing.assert_array_equal(out[..., 1], (z.argmax(-1) == labels).astype("float32"))


def test_missing_labels_are_named():
    lm = gemma("gemma", None)
    x, _, _ = batch()
    del x["loss_labels"]
    with pytest.raises(ValueError, match="loss_labels"):
        CompletionLoss(lm)(x)


@pytest.mark.one_backend
def test_chunk_sizes_bound_the_logits_of_one_piece():
    # Gemma 3's vocabulary at the study's 288 completion tokens: one block, eight equal chunks
    assert chunk_sizes(288, 262_144) == (288, 32_768)
    assert chunk_sizes(288, 256_000) == (288, 51_200)  # Gemma 1/2: 5 chunks divide it
    assert chunk_sizes(288, 262_147) == (288, 52_430)  # a prime: near-equal chunks, a shorter tail
    assert chunk_sizes(5000, 262_144) == (1024, 16_384)  # tall batches: blocks of TOKEN_BLOCK tokens
    assert chunk_sizes(None, 262_144) == (1024, 16_384)  # a batch traced as unknown
    assert chunk_sizes(15, 61) == (15, 61)  # a small vocabulary: one chunk
    assert chunk_sizes(4, 61, chunk_vocab=16) == (4, 16) and chunk_sizes(2**30, 2**30, budget=10) == (1024, 1)
