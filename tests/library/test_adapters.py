"""Adapter files: format, round trips (also across backends), refusals, merging."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import lora3
import tiny
from lora3.adapters import CONFIG_NAME, WEIGHTS_NAME

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/ (tiny.py)


def _np(x):
    return keras.ops.convert_to_numpy(x)


def t5_out(model, x):
    return _np(getattr(model, "backbone", model)(x)["decoder_sequence_output"])


@pytest.fixture
def adapted(tmp_path):
    """A tiny T5 with a random-valued all_linear adapter, saved to tmp_path/adapter."""
    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone()
    bb.save_weights(str(tmp_path / "base.weights.h5"))
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear"))
    tiny.randomize_lora(bb)
    lora3.save_adapter(bb, tmp_path / "adapter")
    return bb, tmp_path


def fresh_base(tmp_path):
    bb = tiny.t5_backbone()
    bb.load_weights(str(tmp_path / "base.weights.h5"))
    return bb


def test_file_format(adapted):
    bb, tmp = adapted
    from safetensors.numpy import load_file

    meta = json.loads((tmp / "adapter" / CONFIG_NAME).read_text())
    for key in ("rank", "alpha", "rslora", "dropout", "targets", "layer_paths", "base_class", "base_fingerprint", "lora3_version"):
        assert key in meta
    assert meta["rank"] == 2 and meta["alpha"] == 4 and meta["targets"] == "all_linear"
    assert meta["base_class"] == "T5Backbone" and meta["lora3_version"] == lora3.__version__
    tensors = load_file(str(tmp / "adapter" / WEIGHTS_NAME))
    assert len(tensors) == 2 * len(meta["layer_paths"]) == 2 * 36
    wrappers = {w.path: w for w in lora3.lora_layers(bb)}
    for path in meta["layer_paths"]:
        a, b = tensors[f"{path}/lora_A"], tensors[f"{path}/lora_B"]
        assert a.dtype == np.float32 and a.shape == (wrappers[path].in_features, 2)
        assert b.shape == (2, wrappers[path].out_features)
        np.testing.assert_array_equal(a, _np(wrappers[path].lora_A).T)  # file: (in, rank); variable: (rank, in)
    key = "transformer_encoder_layer_0/self_attention/query_projector/lora_A"
    assert key in tensors
    assert not [p for p in os.listdir(tmp) if p.startswith(".adapter")]  # no temp dirs left


def test_round_trip_and_trainable_flag(adapted):
    bb, tmp = adapted
    x = tiny.t5_inputs()
    expected = t5_out(bb, x)
    for trainable in (True, False):
        other = fresh_base(tmp)
        report = lora3.load_adapter(other, tmp / "adapter", trainable=trainable)
        assert len(report.rows) == 36
        np.testing.assert_allclose(t5_out(other, x), expected, rtol=1e-6, atol=1e-6)
        assert (report.trainable_params > 0) is trainable


def test_load_into_existing_lora_layers(adapted):
    bb, tmp = adapted
    other = fresh_base(tmp)
    lora3.apply_lora(other, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear"))
    lora3.load_adapter(other, tmp / "adapter")
    x = tiny.t5_inputs()
    np.testing.assert_allclose(t5_out(other, x), t5_out(bb, x), rtol=1e-6, atol=1e-6)


def test_task_and_backbone_share_an_adapter(tmp_path):
    keras.utils.set_random_seed(1)
    lm = tiny.gemma_lm()
    lm.backbone.save_weights(str(tmp_path / "base.weights.h5"))
    lora3.apply_lora(lm, lora3.LoraConfig(rank=2, targets="qv"))
    tiny.randomize_lora(lm)
    lora3.save_adapter(lm, tmp_path / "a")
    bb = tiny.gemma_backbone(vocab=lm.backbone.vocabulary_size)
    bb.load_weights(str(tmp_path / "base.weights.h5"))
    lora3.load_adapter(bb, tmp_path / "a")
    x = tiny.gemma_inputs(vocab=lm.backbone.vocabulary_size)
    np.testing.assert_allclose(_np(bb(x)), _np(lm.backbone(x)), rtol=1e-6, atol=1e-6)
    lora3.save_adapter(bb, tmp_path / "b")
    lm2 = tiny.gemma_lm()
    lora3.load_adapter(lm2, tmp_path / "b")  # and back onto the task model


def _snapshot(model):
    return [(_np(w).copy()) for w in model.weights], len(model.layers)


def _assert_unchanged(model, snap):
    assert not lora3.lora_layers(model)
    for w, v in zip(model.weights, snap[0]):
        np.testing.assert_array_equal(_np(w), v)


CORRUPTIONS = {
    "truncated": "does not match the sha256",
    "altered": "does not match the sha256",
    "garbage": "does not match the sha256",
    "missing_tensor": "lacks tensor",
    "extra_tensor": "name no adapted layer",
    "wrong_shape": "has shape (3, 3)",
    "missing_field": "has no field 'base_fingerprint'",
    "wrong_type": "field 'rank' must be int",
    "bad_json": "is not valid JSON",
    "dotdot_path": "is not a model layer path",
    "no_config": "adapter_config.json is missing",
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_refusals_name_the_problem_and_leave_the_model_unchanged(adapted, case):
    _, tmp = adapted
    tiny.corrupt_adapter(case, tmp / "adapter")
    other = fresh_base(tmp)
    snap = _snapshot(other)
    with pytest.raises(lora3.AdapterError, match=CORRUPTIONS[case].replace("(", r"\(").replace(")", r"\)")):
        lora3.load_adapter(other, tmp / "adapter")
    _assert_unchanged(other, snap)


def test_refuses_another_architecture(adapted):
    _, tmp = adapted
    other = tiny.t5_backbone(hidden=32)
    snap = _snapshot(other)
    with pytest.raises(lora3.AdapterError, match="another architecture or size"):
        lora3.load_adapter(other, tmp / "adapter")
    _assert_unchanged(other, snap)
    with pytest.raises(lora3.AdapterError, match="does not exist"):
        lora3.load_adapter(other, tmp / "nowhere")


def test_save_refuses_overwrite_when_asked(adapted):
    bb, tmp = adapted
    before = (tmp / "adapter" / WEIGHTS_NAME).read_bytes()
    with pytest.raises(lora3.AdapterError, match="already exists"):
        lora3.save_adapter(bb, tmp / "adapter", overwrite=False)
    assert (tmp / "adapter" / WEIGHTS_NAME).read_bytes() == before
    with pytest.raises(lora3.AdapterError, match="no LoRA layers"):
        lora3.save_adapter(tiny.t5_backbone(), tmp / "x")


def test_merge_and_unload_then_stock_preset(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(2)
    lm = tiny.t5_lm()
    lora3.apply_lora(lm, lora3.LoraConfig(rank=2, targets="all_linear"))
    tiny.randomize_lora(lm)
    x = tiny.t5_inputs(vocab=lm.backbone.vocabulary_size)
    unmerged = t5_out(lm, x)
    merged = lora3.merge_and_unload(lm)
    assert merged is lm
    assert not any(type(l).__module__.startswith("lora3") for l in lm._flatten_layers())
    assert "lora3" not in lm.get_config() and "lora3" not in lm.backbone.get_config()
    out = t5_out(lm, x)
    assert np.max(np.abs(out - unmerged)) <= 1e-5 * np.max(np.abs(unmerged)) + 1e-6
    assert lm.backbone.trainable_weights  # trainability restored as before surgery
    lm.save_to_preset(str(tmp_path / "merged"))
    stock = keras_hub.models.T5Seq2SeqLM.from_preset(str(tmp_path / "merged"))
    np.testing.assert_allclose(t5_out(stock, x), out, rtol=1e-6, atol=1e-6)


CROSS_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, keras
    sys.path.insert(0, {here!r})
    import lora3, tiny
    keras.utils.set_random_seed(7)
    bb = tiny.gemma_backbone()
    bb.save_weights({out!r} + "/base.weights.h5")
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="all_linear"))
    tiny.randomize_lora(bb, seed=7)
    lora3.save_adapter(bb, {out!r} + "/adapter")
    y = keras.ops.convert_to_numpy(bb(tiny.gemma_inputs()))
    np.save({out!r} + "/y.npy", y)
    print("saved under", keras.backend.backend())
    """
)


def test_adapter_from_the_other_backend(tmp_path):
    other = "tensorflow" if keras.backend.backend() == "jax" else "jax"
    env = {**os.environ, "KERAS_BACKEND": other}
    script = CROSS_SCRIPT.format(here=HERE, out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"saved under {other}" in proc.stdout
    bb = tiny.gemma_backbone()
    bb.load_weights(str(tmp_path / "base.weights.h5"))
    lora3.load_adapter(bb, tmp_path / "adapter")
    np.testing.assert_allclose(_np(bb(tiny.gemma_inputs())), np.load(tmp_path / "y.npy"), rtol=1e-5, atol=1e-5)


def _mixed_config():
    return lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", exclude=".*decoder.*/cross_attention/.*",
                            rank_pattern={"query_projector": 4, "transformer_decoder_layer_1/.*": 3},
                            alpha_pattern={"output_projector": 7})


def test_per_layer_ranks_save_load_and_keras_file(tmp_path):
    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone()
    bb.save_weights(str(tmp_path / "base.weights.h5"))
    config = _mixed_config()
    lora3.apply_lora(bb, config)
    tiny.randomize_lora(bb, seed=3, scale=0.3)
    x = tiny.t5_inputs()
    want = t5_out(bb, x)
    ranks = {w.path: (w.rank, w.alpha) for w in lora3.lora_layers(bb)}
    assert {r for r, _ in ranks.values()} == {2, 3, 4} and {a for _, a in ranks.values()} == {4.0, 7.0}
    lora3.save_adapter(bb, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert meta["rank_pattern"] == config.rank_pattern and meta["exclude"] == list(config.exclude)
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    for path, (rank, _) in ranks.items():
        assert tensors[f"{path}/lora_A"].shape[1] == rank and tensors[f"{path}/lora_B"].shape[0] == rank
    again = fresh_base(tmp_path)
    lora3.load_adapter(again, tmp_path / "adapter")
    assert {w.path: (w.rank, w.alpha) for w in lora3.lora_layers(again)} == ranks
    np.testing.assert_allclose(t5_out(again, x), want, rtol=1e-5, atol=1e-6)
    lora3.load_adapter(again, tmp_path / "adapter")  # into the layers already there: per-layer shapes fit
    # a tampered config (one rank changed) is refused by the tensors' shapes
    meta["rank_pattern"] = {"query_projector": 2, "transformer_decoder_layer_1/.*": 3}
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(lora3.AdapterError, match="query_projector/lora_A' has shape .*needs"):
        lora3.load_adapter(fresh_base(tmp_path), tmp_path / "adapter")
    bb.save(str(tmp_path / "model.keras"))
    loaded = lora3.load_model(str(tmp_path / "model.keras"))
    assert {w.path: (w.rank, w.alpha) for w in lora3.lora_layers(loaded)} == ranks
    np.testing.assert_allclose(t5_out(loaded, x), want, rtol=1e-5, atol=1e-6)


def test_settings_the_config_does_not_give_are_recorded_by_path(tmp_path):
    bb = tiny.t5_backbone(layers=1)
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, alpha=4, targets="qv"))
    odd = lora3.lora_layers(bb)[0]
    odd.get_adapter().alpha = 9.0  # as a layer edited after the surgery would be
    lora3.save_adapter(bb, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert meta["alpha_pattern"] == {re.escape(odd.path): 9.0}
    again = tiny.t5_backbone(layers=1)
    lora3.load_adapter(again, tmp_path / "adapter")
    assert [w.alpha for w in lora3.lora_layers(again)] == [w.get_adapter().alpha for w in lora3.lora_layers(bb)]
