"""`lora3.sharding`'s pure parts: the rules, the layout map on a 1-device mesh, and
`LoraModelParallel`'s per-shape decisions on a 2-device mesh that is never materialised
(layouts are plain data until a variable is created under the distribution)."""

import re
from types import SimpleNamespace

import keras
import pytest

from lora3.sharding import (
    EMBEDDING_RULES,
    GEMMA_RULES,
    MODEL_AXIS,
    T5_RULES,
    DistributionError,
    layout_map,
    model_parallel_class,
    rules_for,
)

pytestmark = pytest.mark.one_backend  # layouts are data: the same on every backend


def t5_paths():
    blocks = ["transformer_encoder_layer_0", "transformer_decoder_layer_1"]
    attention = [f"{b}/{a}/{p}_projector" for b in blocks for a in ("self_attention", "cross_attention")
                 for p in ("query", "key", "value", "output")]
    return attention + [f"{b}/{p}_projector" for b in blocks for p in ("input", "gate", "output")]


def gemma_paths():
    return ([f"decoder_block_3/attention/{p}" for p in ("query", "key", "value", "attention_output")]
            + [f"decoder_block_3/{p}" for p in ("ffw_gating", "ffw_gating_2", "ffw_linear")])


def one_device_mesh():
    return keras.distribution.DeviceMesh((1, 1), ("batch", "model"), keras.distribution.list_devices()[:1])


def two_device_mesh():
    return keras.distribution.DeviceMesh((1, 2), ("batch", "model"), ["cpu:0", "cpu:1"])


def var(path, shape):
    return SimpleNamespace(path=path, shape=shape, _layout=None)


def test_rules_for():
    assert rules_for("t5") is T5_RULES
    assert rules_for("gemma") is GEMMA_RULES and rules_for("gemma3") is GEMMA_RULES
    with pytest.raises(DistributionError, match=re.escape(
            "distribution=model_parallel has layouts for model.family in ['gemma', 'gemma3', 't5'], not 'bert'")):
        rules_for("bert")


@pytest.mark.parametrize("family, paths", [("t5", t5_paths()), ("gemma", gemma_paths())])
def test_every_adaptable_projection_has_exactly_one_rule(family, paths):
    for path in paths:
        matching = [r for r in rules_for(family) if re.fullmatch(r.pattern, path)]
        assert len(matching) == 1, (path, matching)
    assert not any(re.fullmatch(r.pattern, "token_embedding") for r in rules_for(family))
    assert re.fullmatch(EMBEDDING_RULES[0].pattern, "token_embedding")


@pytest.mark.parametrize("family", ["t5", "gemma"])
def test_layout_map_on_one_device(family):
    lm = layout_map(family, one_device_mesh())
    for rule in rules_for(family):
        kernel = lm[rule.pattern + "/kernel"].axes
        assert kernel[rule.axis] == MODEL_AXIS and kernel.count(MODEL_AXIS) == 1 and len(kernel) == len(rule.dims)
        a, b = lm[rule.pattern + "/lora_A"].axes, lm[rule.pattern + "/lora_B"].axes
        if rule.kind == "column":  # output side split: B (rank, out) splits on out, A is replicated
            assert (a, b) == ((None, None), (None, MODEL_AXIS))
        else:  # input side split: A (rank, in) splits on in, B is replicated
            assert (a, b) == ((None, MODEL_AXIS), (None, None))
    assert lm["token_embedding/embeddings"].axes == (MODEL_AXIS, None)
    assert lm["token_embedding/reverse_embeddings"].axes == (None, MODEL_AXIS)


def test_model_parallel_on_one_device_replicates_everything():
    dist = model_parallel_class()(family="t5", device_mesh=one_device_mesh())
    assert dist.model_size == 1
    for path, shape in [("transformer_encoder_layer_0/self_attention/query_projector/kernel", (16, 16)),
                        ("transformer_encoder_layer_0/self_attention/query_projector/lora_B", (2, 16)),
                        ("token_embedding/embeddings", (64, 16))]:
        assert dist.get_variable_layout(var(path, shape)).axes == (None, None)
    assert dist.decisions == {}


def test_column_parallel_kernel_and_adapter():
    dist = model_parallel_class()(family="t5", device_mesh=two_device_mesh())
    base = "transformer_decoder_layer_1/cross_attention/value_projector"
    assert dist.get_variable_layout(var(f"{base}/kernel", (16, 32))).axes == (None, MODEL_AXIS)
    assert dist.get_variable_layout(var(f"{base}/lora_A", (4, 16))).axes == (None, None)
    assert dist.get_variable_layout(var(f"{base}/lora_B", (4, 32))).axes == (None, MODEL_AXIS)
    assert set(dist.decisions) == {f"{base}/{leaf}" for leaf in ("kernel", "lora_A", "lora_B")}
    assert base in dist.table()


def test_row_parallel_kernel_and_adapter():
    dist = model_parallel_class()(family="gemma", device_mesh=two_device_mesh())
    base = "decoder_block_0/attention/attention_output"
    assert dist.get_variable_layout(var(f"{base}/kernel", (4, 8, 16))).axes == (MODEL_AXIS, None, None)
    assert dist.get_variable_layout(var(f"{base}/lora_A", (2, 32))).axes == (None, MODEL_AXIS)
    assert dist.get_variable_layout(var(f"{base}/lora_B", (2, 16))).axes == (None, None)
    # a named adapter's variables (`lora_A_<name>`) are laid out as the default adapter's
    assert dist.get_variable_layout(var(f"{base}/lora_A_fr", (2, 32))).axes == (None, MODEL_AXIS)
    assert dist.get_variable_layout(var(f"{base}/lora_B_fr", (2, 16))).axes == (None, None)


def test_indivisible_kernel_is_replicated_with_its_adapter():
    dist = model_parallel_class()(family="gemma", device_mesh=two_device_mesh())
    base = "decoder_block_0/attention/key"
    assert dist.get_variable_layout(var(f"{base}/kernel", (1, 16, 4))).axes == (None, None, None)
    note = dist.decisions[f"{base}/kernel"][1]
    assert "num_key_value_heads=1 does not divide the 'model' mesh axis (2 devices)" in note
    # lora_B (rank, heads*head_dim) = (2, 4) would divide, but follows its kernel: replicated.
    assert dist.get_variable_layout(var(f"{base}/lora_B", (2, 4))).axes == (None, None)


def test_indivisible_kernel_with_on_indivisible_error():
    dist = model_parallel_class()(family="gemma", device_mesh=two_device_mesh(), on_indivisible="error")
    with pytest.raises(DistributionError, match=re.escape("num_key_value_heads=1 does not divide")):
        dist.get_variable_layout(var("decoder_block_0/attention/value/kernel", (1, 16, 4)))


def test_embedding_falls_back_to_the_hidden_axis():
    dist = model_parallel_class()(family="t5", device_mesh=two_device_mesh())
    assert dist.get_variable_layout(var("token_embedding/embeddings", (64, 16))).axes == (MODEL_AXIS, None)
    assert dist.get_variable_layout(var("token_embedding/embeddings", (65, 16))).axes == (None, MODEL_AXIS)
    assert dist.get_variable_layout(var("token_embedding/reverse_embeddings", (16, 64))).axes == (None, MODEL_AXIS)


def test_unmatched_and_preset_layouts():
    dist = model_parallel_class()(family="t5", device_mesh=two_device_mesh())
    assert dist.get_variable_layout(var("transformer_encoder_layer_0/layer_norm/scale", (16,))).axes == (None,)
    preset = SimpleNamespace(path="x/kernel", shape=(2, 2), _layout="already chosen")
    assert dist.get_variable_layout(preset) == "already chosen"
    assert dist.decisions == {}
