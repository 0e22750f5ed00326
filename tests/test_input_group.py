"""LoRA layers that read one input share one `x @ [A_1|A_2|...]` product (lora3/layers/input_group.py).

The grouped model must give the ungrouped model's outputs and gradients (compared through one
SGD step), the group must actually engage on T5 and Gemma, and a cached product must never be
served outside the forward pass it was computed in."""

import numpy as np
import pytest

import tiny


def _ungroup(model):
    import lora3

    for w in lora3.lora_layers(model):
        object.__setattr__(w, "_input_group", None)


def _groups(model):
    import lora3

    return {id(w._input_group): w._input_group for w in lora3.lora_layers(model) if w._input_group is not None}


def _pair(arch):
    """Two identical adapted backbones; the second without input groups."""
    import keras

    import lora3

    models = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        bb = tiny.t5_backbone() if arch == "t5" else tiny.gemma_backbone()
        lora3.apply_lora(bb, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear"))
        tiny.randomize_lora(bb, seed=1)
        models.append(bb)
    _ungroup(models[1])
    inputs = tiny.t5_inputs() if arch == "t5" else tiny.gemma_inputs()
    return models, inputs


@pytest.mark.parametrize("arch", ["t5", "gemma"])
def test_groups_form_on_shared_inputs(arch):
    (grouped, _), _ = _pair(arch)
    names = [sorted(m.path.rsplit("/", 1)[-1] for m in g.members) for g in _groups(grouped).values()]
    if arch == "t5":
        assert ["key_projector", "output_projector", "query_projector", "value_projector"] in names
        assert ["gate_projector", "input_projector"] in names  # the FFN's two input projections
    else:
        assert any({"query", "key", "value"} <= set(n) for n in names), names


def _output(bb, inputs, arch):
    y = bb(inputs)
    return y["decoder_sequence_output"] if arch == "t5" else y


@pytest.mark.parametrize("arch", ["t5", "gemma"])
def test_grouped_outputs_and_sgd_step_equal_ungrouped(arch):
    import keras

    import lora3

    (grouped, plain), inputs = _pair(arch)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(_output(grouped, inputs, arch)),
                               keras.ops.convert_to_numpy(_output(plain, inputs, arch)), rtol=1e-5, atol=1e-6)
    assert sum(g.hits for g in _groups(grouped).values()) > 0  # the shared products were served

    # One SGD step on the same loss: equal LoRA weights afterwards means equal gradients.
    before = [keras.ops.convert_to_numpy(w.lora_A) for w in lora3.lora_layers(plain)]
    for bb in (grouped, plain):
        x = {k: keras.Input(shape=v.shape[1:], dtype=v.dtype, name=k) for k, v in inputs.items()}
        head = keras.Model(x, keras.ops.sum(keras.ops.square(_output(bb, x, arch)), axis=-1))
        head.compile(optimizer=keras.optimizers.SGD(100.0), loss="mse")  # big lr: A moves well past the tolerance
        head.train_on_batch(inputs, np.zeros((2,) + tuple(head.output.shape[1:]), "float32"))
    moved = 0.0
    for wg, wp, a0 in zip(lora3.lora_layers(grouped), lora3.lora_layers(plain), before):
        assert wg.path == wp.path
        moved = max(moved, float(np.abs(keras.ops.convert_to_numpy(wp.lora_A) - a0).max()))
        for a, b in ((wg.lora_A, wp.lora_A), (wg.lora_B, wp.lora_B)):
            np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                       rtol=1e-5, atol=1e-6, err_msg=wg.path)
    assert moved > 1e-4  # the step did change A: the comparison is not vacuous


def test_no_product_is_served_across_calls():
    """Call q and k on one tensor in two separate calls, changing k's A in between: k must
    see its new A (a product cached in the first call would be stale)."""
    import keras

    import lora3

    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone()
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, alpha=4, targets="qv"))
    tiny.randomize_lora(bb, seed=3)
    attn = bb.get_layer("transformer_encoder_layer_0").self_attention
    q, v = attn.query_projector, attn.value_projector
    assert q._input_group is not None and q._input_group is v._input_group
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32"))
    q(x)  # would cache [A_q | A_v] on x if products outlived the call
    v.lora_A.assign(np.ones(v.lora_A.shape, "float32"))
    got = keras.ops.convert_to_numpy(v(x))
    xn = keras.ops.convert_to_numpy(x)
    ref = xn @ keras.ops.convert_to_numpy(v.wrapped.kernel) + v.scaling * (xn @ np.ones(v.lora_A.shape)) @ (
        keras.ops.convert_to_numpy(v.lora_B))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_dropout_and_merged_layers_compute_alone():
    import keras

    import lora3

    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone()
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, alpha=4, targets="qv", dropout=0.5))
    bb(tiny.t5_inputs())
    assert sum(g.hits for g in _groups(bb).values()) == 0  # per-layer dropout masks: never shared
