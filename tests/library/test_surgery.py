"""Surgery over keras-hub T5 and Gemma: targets, freezing, report, training, generate."""

import re

import keras
import numpy as np
import pytest

import lora3
import tiny
from lora3.surgery import LoraState, lora_state, unload, wrapper_class


def _np(x):
    return keras.ops.convert_to_numpy(x)


def roles(report):
    return sorted({r.role for r in report.rows})


def test_t5_roles_groups_and_counts():
    bb = tiny.t5_backbone(layers=2)
    report = lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="qv"))
    # 2 encoder blocks x (q, v) + 2 decoder blocks x (self, cross) x (q, v)
    assert len(report.rows) == 12 and roles(report) == ["q", "v"]
    assert all(r.path.endswith(("query_projector", "value_projector")) for r in report.rows)
    assert report.lora_params == 12 * 2 * (16 + 16)
    assert report.trainable_params == report.lora_params
    assert report.total_params == bb.count_params()
    assert report.percent == pytest.approx(100 * report.lora_params / bb.count_params())
    table = str(report)
    assert "transformer_encoder_layer_0/self_attention/query_projector" in table and "trainable%" in table


@pytest.mark.parametrize(
    "targets, count, expected_roles",
    [
        ("attention", 24, ["k", "o", "q", "v"]),
        ("mlp", 12, ["down", "gate", "up"]),
        ("all_linear", 36, ["down", "gate", "k", "o", "q", "up", "v"]),
        (["q", "down"], 10, ["down", "q"]),
        ("gate", 4, ["gate"]),
    ],
)
def test_t5_target_groups(targets, count, expected_roles):
    report = lora3.apply_lora(tiny.t5_backbone(), lora3.LoraConfig(rank=2, targets=targets))
    assert len(report.rows) == count and roles(report) == expected_roles


def test_t5_gate_is_the_activation_branch():
    bb = tiny.t5_backbone()
    report = lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets=["gate", "up"]))
    by_role = {r.role: r.path for r in report.rows}
    assert by_role["gate"].endswith("input_projector") and by_role["up"].endswith("gate_projector")
    gate = [w for w in lora3.lora_layers(bb) if w.path == by_role["gate"]][0]
    assert gate.wrapped.activation is not None and gate.wrapped.activation.__name__ == "gelu"


def test_layers_restriction_and_regex():
    report = lora3.apply_lora(tiny.t5_backbone(), lora3.LoraConfig(rank=2, targets="qv", layers=["decoder.1"]))
    assert {r.path.split("/")[0] for r in report.rows} == {"transformer_decoder_layer_1"}
    assert len(report.rows) == 4
    report = lora3.apply_lora(tiny.t5_backbone(), lora3.LoraConfig(rank=2, targets="qv", layers=[0]))
    assert {r.path.split("/")[0] for r in report.rows} == {"transformer_encoder_layer_0", "transformer_decoder_layer_0"}
    report = lora3.apply_lora(
        tiny.t5_backbone(), lora3.LoraConfig(rank=2, targets=r"transformer_encoder_layer_\d+/self_attention/key_projector")
    )
    assert [r.path for r in report.rows] == [
        "transformer_encoder_layer_0/self_attention/key_projector",
        "transformer_encoder_layer_1/self_attention/key_projector",
    ]


def test_gemma_roles_einsum_shapes_and_attribute_swap():
    bb = tiny.gemma_backbone()
    block = bb.get_layer("decoder_block_0")
    report = lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="all_linear"))
    assert len(report.rows) == 14 and roles(report) == ["down", "gate", "k", "o", "q", "up", "v"]
    rows = {r.path: r for r in report.rows}
    q = rows["decoder_block_0/attention/query"]
    assert (q.kind, q.in_features, q.out_features) == ("EinsumDense", 16, 4 * 4)
    k = rows["decoder_block_0/attention/key"]
    assert (k.in_features, k.out_features) == (16, 2 * 4)
    o = rows["decoder_block_0/attention/attention_output"]
    assert (o.in_features, o.out_features) == (16, 16)
    # Gemma keeps `ffw_gating` in the attribute `gating_ffw`: found by identity.
    assert isinstance(block.gating_ffw, lora3.LoRAEinsumDense) and block.gating_ffw.path == "decoder_block_0/ffw_gating"
    assert isinstance(block.attention.query_dense, lora3.LoRAEinsumDense)


def test_surgery_keeps_outputs_and_freezes_everything_else():
    bb = tiny.gemma_backbone()
    x = tiny.gemma_inputs()
    before = _np(bb(x))
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="all_linear"))
    np.testing.assert_array_equal(_np(bb(x)), before)
    names = {v.path.rsplit("/", 1)[1] for v in bb.trainable_weights}
    assert names == {"lora_A", "lora_B"}


def test_train_also_layer_norm():
    bb = tiny.t5_backbone()
    report = lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="qv", train_also=["layer_norm"]))
    extra = [v.path for v in bb.trainable_weights if "lora_" not in v.path]
    assert extra and all("norm" in p for p in extra)
    assert report.trainable_params == report.lora_params + sum(int(np.prod(v.shape)) for v in bb.trainable_weights if "lora_" not in v.path)


@pytest.mark.parametrize("family", ["t5", "gemma"])
def test_fit_trains_only_lora_and_generate_works(family):
    keras.utils.set_random_seed(0)
    lm = tiny.t5_lm() if family == "t5" else tiny.gemma_lm()
    lora3.apply_lora(lm, lora3.LoraConfig(rank=4, alpha=8, targets="all_linear"))
    frozen = [(v, _np(v).copy()) for v in lm.non_trainable_weights if "float" in str(v.dtype)]
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               sampler="greedy")
    if family == "t5":
        data = {"encoder_text": ["ein mann fährt fahrrad"] * 8, "decoder_text": ["a man rides a bike"] * 8}
        prompt = ["ein mann fährt fahrrad"]
    else:
        data = ["ein mann fährt fahrrad a man rides a bike"] * 8
        prompt = ["ein mann fährt fahrrad"]
    history = lm.fit(x=data, batch_size=4, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    for v, value in frozen:  # (paths are not unique: T5's relative position embeddings)
        np.testing.assert_array_equal(_np(v), value, err_msg=v.path)
    out = lm.generate(prompt, max_length=12)
    assert isinstance(out[0], str)


def test_surgery_on_local_preset(tmp_path):
    import keras_hub

    lm = tiny.t5_lm()
    lm.save_to_preset(str(tmp_path / "preset"))
    loaded = keras_hub.models.T5Seq2SeqLM.from_preset(str(tmp_path / "preset"))
    report = lora3.apply_lora(loaded, lora3.LoraConfig(rank=2, targets="qv"))
    assert len(report.rows) == 12


def test_functional_graph_node_is_refused():
    inputs = keras.Input((4,))
    head = keras.layers.Dense(3, name="logits")
    model = keras.Model(inputs, head(keras.layers.Dense(4, name="hidden")(inputs)))
    with pytest.raises(lora3.LoraConfigError, match="node of the functional model"):
        lora3.apply_lora(model, lora3.LoraConfig(rank=1, targets="logits"))
    assert not lora3.lora_layers(model)

    # A built Sequential calls its top-level layers through its own graph: a wrapper swapped into
    # its layer list would silently never run, so it is refused too (its blocks' layers are fine).
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="proj")])
    with pytest.raises(lora3.LoraConfigError, match="node of the functional model 'sequential"):
        lora3.apply_lora(seq, lora3.LoraConfig(rank=1, targets=".*proj"))
    assert not lora3.lora_layers(seq) and type(seq.layers[0]).__name__ == "Dense"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": "nothing_here"}, "target 'nothing_here' matches no adaptable layer"),
        ({"targets": ["q", "zzz"]}, "target 'zzz' matches no adaptable layer"),
        ({"targets": "qv", "layers": [7]}, "matches no adaptable layer within layers=[7]"),
        ({"targets": "qv", "layers": ["middle"]}, "layers entry 'middle' is not valid"),
        ({"rank": 17}, "rank=17 is larger than layer"),
        ({"targets": "(unclosed"}, "neither a role"),
        ({"train_also": ["no_such_weight"]}, "train_also entry 'no_such_weight' matches no weight"),
    ],
)
def test_surgery_errors_leave_the_model_alone(kwargs, message):
    bb = tiny.t5_backbone()
    weights = [_np(w).copy() for w in bb.weights]
    with pytest.raises(lora3.LoraConfigError, match=re.escape(message)) as info:
        lora3.apply_lora(bb, lora3.LoraConfig(**{"rank": 2, **kwargs}))
    assert not lora3.lora_layers(bb)
    for w, v in zip(bb.weights, weights):
        np.testing.assert_array_equal(_np(w), v)
    if "matches no adaptable" in message:
        # The message lists role names and the model's adaptable layers.
        assert "gate" in str(info.value) and "transformer_encoder_layer_0/" in str(info.value)


def test_surgery_twice_is_refused():
    bb = tiny.t5_backbone()
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2))
    with pytest.raises(lora3.LoraConfigError, match="surgery applied twice"):
        lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="mlp"))


def test_role_names_need_a_known_family():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(4, name="hidden")(inputs)

    class Block(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.inner = keras.layers.Dense(4, name="inner")

        def call(self, x):
            return self.inner(x)

    model = keras.Model(inputs, Block(name="block")(x))
    with pytest.raises(lora3.LoraConfigError, match="role name, but this model has no role map"):
        lora3.apply_lora(model, lora3.LoraConfig(rank=1, targets="qv"))
    report = lora3.apply_lora(model, lora3.LoraConfig(rank=1, targets=r"block/inner"))
    assert [r.path for r in report.rows] == ["block/inner"]


def test_gemma3_role_map():
    import keras_hub

    bb = keras_hub.models.Gemma3Backbone(
        vocabulary_size=64, image_size=None, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=32, head_dim=4,
    )
    report = lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="all_linear"))
    assert len(report.rows) == 14 and roles(report) == ["down", "gate", "k", "o", "q", "up", "v"]


class Wide(keras.layers.Dense):
    """A Dense subclass: adapted through the wrapper table's MRO lookup."""


class TwoProjections(keras.layers.Layer):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.inner = Wide(6, name="inner")
        self.heads = keras.layers.EinsumDense("bd,dnh->bnh", output_shape=(2, 3), name="heads")

    def call(self, x):
        return keras.ops.reshape(self.heads(self.inner(x)), (-1, 6))


def two_projection_model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, TwoProjections(name="block")(inputs))


def test_wrapper_classes_come_from_the_table_by_mro():
    assert wrapper_class(Wide(3)) is lora3.LoRADense
    assert wrapper_class(keras.layers.EinsumDense("ab,bc->ac", output_shape=3)) is lora3.LoRAEinsumDense
    assert wrapper_class(keras.layers.Embedding(4, 2)) is None
    model = two_projection_model()
    report = lora3.apply_lora(model, lora3.LoraConfig(rank=2, targets=r"block/.*"))
    assert [(r.path, r.kind) for r in report.rows] == [("block/heads", "EinsumDense"), ("block/inner", "Wide")]
    assert isinstance(model.get_layer("block").inner, lora3.LoRADense)


def test_the_surgery_is_recorded_on_the_model_not_in_a_patched_get_config():
    bb = tiny.t5_backbone()
    config_before = bb.get_config()
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="qv"))
    assert "get_config" not in vars(bb) and bb.get_config() == config_before
    state = lora_state(bb)
    assert isinstance(state, LoraState) and state.lora_config == lora3.LoraConfig(rank=2, targets="qv")
    assert list(state.roles) == [w.path for w in lora3.lora_layers(bb)]
    # The state is neither a layer nor a weight of the model.
    assert all(l is not state for l in bb._flatten_layers()) and len(state.weights) == 0


def test_unload_puts_the_base_back_without_merging():
    keras.utils.set_random_seed(5)
    model = two_projection_model()
    x = np.random.default_rng(5).normal(size=(3, 4)).astype("float32")
    base = _np(model(x))
    flags = [v.trainable for v in model.weights]
    lora3.apply_lora(model, lora3.LoraConfig(rank=2, targets=r"block/.*"))
    tiny.randomize_lora(model, scale=0.5)
    assert not np.allclose(_np(model(x)), base)
    assert unload(model) is model
    assert not lora3.lora_layers(model) and lora_state(model) is None
    np.testing.assert_array_equal(_np(model(x)), base)
    assert [v.trainable for v in model.weights] == flags
    lora3.apply_lora(model, lora3.LoraConfig(rank=1, targets=r"block/inner"))  # and again
    assert len(lora3.lora_layers(model)) == 1


def test_a_float8_quantized_layer_is_refused_before_any_change():
    model = two_projection_model()
    model.get_layer("block").heads.quantize("float8")  # lora3 wraps int8 / int4 layers, not float8
    with pytest.raises(lora3.LoraConfigError, match=re.escape("layer 'block/heads' is quantized with quantization_mode='float8'")):
        lora3.apply_lora(model, lora3.LoraConfig(rank=1, targets=r"block/.*"))
    assert not lora3.lora_layers(model) and lora_state(model) is None


# -- per-layer settings (rank_pattern, alpha_pattern, exclude) --------------------------------------------

class _Two(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj_a = keras.layers.Dense(6, name="proj_a")
        self.proj_b = keras.layers.Dense(5, name="proj_b")
        self.proj_c = keras.layers.Dense(5, name="proj_c")

    def call(self, x):
        return self.proj_c(self.proj_b(self.proj_a(x)))


def _two():
    return keras.Sequential([keras.Input((4,)), _Two(name="block")], name="net")


def test_per_layer_rank_and_alpha_match_a_numpy_forward():
    keras.utils.set_random_seed(0)
    model = _two()
    config = lora3.LoraConfig(rank=2, alpha=4, targets=r".*block/proj_.", rank_pattern={"proj_a": 3},
                              alpha_pattern={"block/proj_b": 9}, exclude=".*proj_c")
    report = lora3.apply_lora(model, config)
    assert [(r.path, r.rank, r.scaling) for r in report.rows] == [("net/block/proj_a", 3, 4 / 3),
                                                                    ("net/block/proj_b", 2, 4.5)]
    assert "rank  scaling" in str(report) and "per layer: rank 2-3, scaling 1.33333-4.5" in str(report)
    tiny.randomize_lora(model, seed=1, scale=0.5)
    x = np.random.default_rng(2).normal(size=(3, 4)).astype("float32")
    h = x
    for w, s in zip(lora3.lora_layers(model), (4 / 3, 4.5)):
        kernel, bias = _np(w.wrapped.kernel), _np(w.wrapped.bias)
        h = h @ kernel + bias + s * (h @ _np(w.lora_A).T) @ _np(w.lora_B)
    c = model.layers[0].proj_c
    want = h @ _np(c.kernel) + _np(c.bias)
    np.testing.assert_allclose(_np(model(x)), want, rtol=1e-5, atol=1e-5)


def test_gemma_patterns_exclude_and_record():
    bb = tiny.gemma_backbone(layers=2)
    config = lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", exclude=["o", "decoder_block_0/ffw_.*"],
                              rank_pattern={"query": 4, "decoder_block_1/.*": 3}, alpha_pattern={"ffw_linear": 6})
    report = lora3.apply_lora(bb, config)
    got = {r.path: (r.rank, r.scaling) for r in report.rows}
    assert not any(p.endswith("attention_output") or p.startswith("decoder_block_0/ffw") for p in got)
    assert got["decoder_block_0/attention/query"] == (4, 1.0) and got["decoder_block_1/attention/query"] == (4, 1.0)
    assert got["decoder_block_0/attention/key"] == (2, 2.0) and got["decoder_block_1/attention/key"] == (3, 4 / 3)
    assert got["decoder_block_1/ffw_linear"] == (3, 2.0)
    assert report.lora_params == sum(r.rank * (r.in_features + r.out_features) for r in report.rows)
    assert lora_state(bb).record()["config"]["rank_pattern"] == {"query": 4, "decoder_block_1/.*": 3}


@pytest.mark.parametrize("kwargs, message", [
    ({"rank_pattern": {"nowhere": 2}}, r"rank_pattern key 'nowhere' matches no adapted layer.*adapted layers: "
                                       r"\[decoder_block_0/attention/query"),
    ({"alpha_pattern": {"ffw_linear": 2}}, r"alpha_pattern key 'ffw_linear' matches no adapted layer"),
    ({"exclude": "nothing_here"}, r"exclude entry 'nothing_here' matches no adaptable layer.*decoder_block_0/"),
    ({"exclude": "qv"}, r"exclude=\['qv'\] takes out every layer"),
    ({"rank_pattern": {"query": 99}}, r"rank"),
])
def test_per_layer_refusals_name_the_key_and_leave_the_model_unchanged(kwargs, message):
    bb = tiny.gemma_backbone(layers=1)
    with pytest.raises(lora3.LoraConfigError, match=message):
        lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="qv", **kwargs))
    assert lora3.lora_layers(bb) == [] and lora_state(bb) is None
