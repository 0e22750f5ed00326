"""Models: tiny configs with a cached SentencePiece tokenizer, packing, preset loading and its errors."""

import os
import time

import numpy as np
import pytest

from lora3.run import backend as lb

keras = lb.select(os.environ.get("KERAS_BACKEND", "jax"))

from lora3.run import models  # noqa: E402
from lora3.run.data import can_reach, load  # noqa: E402

T5_TINY = {"name": "t5_tiny", "family": "t5", "embedding_init_stddev": 1.0,
           "config": {"num_layers": 1, "num_heads": 2, "hidden_dim": 32, "intermediate_dim": 64,
                      "key_value_dim": 16, "dropout": 0.0, "vocabulary_size": 200}}
GEMMA_TINY = {"name": "gemma_tiny", "family": "gemma",
              "config": {"num_layers": 1, "num_query_heads": 2, "num_key_value_heads": 1, "hidden_dim": 32,
                         "intermediate_dim": 64, "head_dim": 16, "dropout": 0.0, "vocabulary_size": 200}}


@pytest.fixture(scope="module")
def data():
    return load({"source": "synthetic", "train_size": 200, "valid_size": 10}, seed=0)


@pytest.fixture(scope="module")
def t5(data, lora3_cache):
    return models.build(T5_TINY, data.tokenizer_texts(), seed=0, cache_dir=lora3_cache)


def test_t5_tiny_tokenizer_is_cached_and_embeddings_are_spread(t5, data, lora3_cache):
    assert t5.kind == "seq2seq" and t5.info["vocabulary_size"] <= 200
    again = models.build(T5_TINY, data.tokenizer_texts(), seed=0, cache_dir=lora3_cache)
    assert again.info["tokenizer_cached"] and again.info["tokenizer_path"] == t5.info["tokenizer_path"]
    emb = keras.ops.convert_to_numpy(t5.model.backbone.token_embedding.embeddings)
    # keras-hub's TruncatedNormal(1.0) would give mean ~1, spread ~0.05: we re-draw N(0, 1).
    assert abs(emb.mean()) < 0.1 and 0.8 < emb.std() < 1.2
    # Same seed, same weights (weights are drawn from numpy, so also across backends).
    w1 = [keras.ops.convert_to_numpy(v) for v in t5.model.backbone.weights]
    w2 = [keras.ops.convert_to_numpy(v) for v in again.model.backbone.weights]
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2))


def test_t5_packing_matches_keras_hub_preprocessor(t5, data):
    src, tgt = data.inputs("train")[:6], data.targets("train")[:6]
    x, y, sw, stats = t5.encode(src, tgt, 20, 16)
    pre = t5.model.preprocessor
    pre.encoder_sequence_length, pre.decoder_sequence_length = 20, 16
    x2, y2, sw2 = pre({"encoder_text": src, "decoder_text": tgt})
    for k in x:
        np.testing.assert_array_equal(x[k], keras.ops.convert_to_numpy(x2[k]))
    np.testing.assert_array_equal(y, keras.ops.convert_to_numpy(y2))
    np.testing.assert_array_equal(sw, keras.ops.convert_to_numpy(sw2))
    assert stats["pairs"] == 6 and stats["tokens"] > 0


def test_overlong_policies(t5, data):
    src, tgt = data.inputs("train")[:8], data.targets("train")[:8]
    with pytest.raises(models.ModelError, match="data.max_source_length allows 3"):
        t5.encode(src, tgt, 4, 64, overlong="error")
    with pytest.raises(models.ModelError, match="left none"):
        t5.encode(src, tgt, 4, 64, overlong="drop")
    x, _, _, stats = t5.encode(src, tgt, 4, 64, overlong="truncate")
    assert stats["truncated"] == 8 and x["encoder_token_ids"].shape == (8, 4)


def test_gemma_tiny_loss_only_on_completion(data, lora3_cache):
    g = models.build(GEMMA_TINY, data.tokenizer_texts(), seed=0, cache_dir=lora3_cache)
    assert g.kind == "causal"
    x, y, sw, _ = g.encode(["ab"], ["cd"], 8, 8)
    ids, mask, pos = x["token_ids"][0], x["padding_mask"][0], x["loss_positions"][0]
    prompt = [int(t) for t in g.tokenizer(["ab\n"])[0]]
    completion = [int(t) for t in g.tokenizer(["cd"])[0]]
    assert ids[0] == g.tokenizer.start_token_id
    assert list(ids[1:1 + len(prompt)]) == prompt
    n = int(sw[0].sum())
    # the loss sees the completion and its <eos>, predicted from the positions just before each
    assert n == len(completion) + 1 and sw[0, n:].sum() == 0
    assert list(y[0, :n]) == completion + [g.tokenizer.end_token_id]
    assert list(pos[:n]) == list(range(len(prompt), len(prompt) + n))
    assert list(ids[pos[1:n]]) == completion  # position p holds the token that precedes label p
    assert mask.sum() == 1 + len(prompt) + len(completion)  # <bos>, prompt, completion (<eos> is a label only)
    assert x["token_ids"].shape == (1, 17) and y.shape == sw.shape == x["loss_positions"].shape == (1, 8)


def test_completion_logits_equal_the_full_model_at_the_loss_positions(data, lora3_cache):
    """CompletionLM's gathered logits are the task model's own logits at those positions, and the
    compiled loss is the mean cross-entropy over the weighted tokens (a numpy reference)."""
    import keras

    from lora3.run import train as tr

    g = models.build(GEMMA_TINY, data.tokenizer_texts(), seed=0, cache_dir=lora3_cache)
    x, y, sw, _ = g.encode(data.inputs("train")[:4], data.targets("train")[:4], 24, 16)
    full = keras.ops.convert_to_numpy(g.model({"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}))
    from lora3.run.completion import CompletionLM

    picked = keras.ops.convert_to_numpy(CompletionLM(g.model)(x))
    ref = np.take_along_axis(full, x["loss_positions"][..., None], axis=1)
    np.testing.assert_allclose(picked, ref, rtol=1e-5, atol=1e-5)
    tr.compile_model(g, {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 0.0,
                         "weight_decay": 0.0, "grad_clip": None}, 1)
    logp = ref - ref.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    expected = float((ce * sw).sum() / sw.sum())
    from lora3.run import evaluate as ev

    got = ev.loss_and_accuracy(g.fit_model, x, y, sw, batch_size=3)  # uneven batches: token-weighted
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert got["tokens"] == sw.sum()


def test_local_preset_dir_round_trip(t5, tmp_path, data, lora3_cache):
    t5.model.save_to_preset(str(tmp_path / "preset"))
    loaded = models.build({"name": "local", "family": "t5", "preset": str(tmp_path / "preset")},
                          [], seed=0, cache_dir=lora3_cache)
    assert loaded.info["preset"] == str((tmp_path / "preset").resolve())
    assert loaded.info["params"] == t5.info["params"]


def test_missing_local_dir_and_offline_preset_fail_clearly():
    with pytest.raises(models.ModelError, match="no such directory"):
        models.load_preset("./does/not/exist", "t5")
    if can_reach(models.KAGGLE_HOST):
        pytest.skip("online: the offline failure path does not apply")
    t = time.time()
    with pytest.raises(models.ModelError, match=r"model\.preset=<local dir>"):
        models.load_preset("flan_small_multi", "t5")
    assert time.time() - t < 20


def _numpy_token_ce(logits, y, sw):
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    return float((ce * sw).sum() / sw.sum())


def test_seq2seq_loss_is_the_per_token_mean_whatever_the_padding(t5, data):
    """With two max_target_length settings (more padding), the reported loss stays the numpy
    per-token cross-entropy of the same tokens: Keras' default reduction would divide by padding too."""
    from lora3.run import evaluate as ev
    from lora3.run import train as tr

    tr.compile_model(t5, {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 0.0,
                          "weight_decay": 0.0, "grad_clip": None}, 1)
    src, tgt = data.inputs("train")[:5], data.targets("train")[:5]
    got = []
    for tgt_len in (64, 96):
        x, y, sw, stats = t5.encode(src, tgt, 96, tgt_len)
        assert stats["truncated"] == 0  # the same tokens, only more padding
        expected = _numpy_token_ce(keras.ops.convert_to_numpy(t5.model(x)).astype("float64"), y, sw)
        res = ev.loss_and_accuracy(t5.model, x, y, sw, batch_size=2)
        assert res["loss"] == pytest.approx(expected, rel=1e-5)
        got.append(res["loss"])
    assert got[0] == pytest.approx(got[1], rel=1e-5)
