"""trainer.remat (lora3/run/remat.py): each transformer block through keras.remat.

The numerics must not change (the loss and every LoRA gradient equal the run without remat), the
blocks must really be recomputed in the backward pass (and nothing else wrapped), and the app's key
checks its values.
"""

import keras
import numpy as np
import pytest

import lora3
from lora3.run import remat
from lora3.run.schema import AppConfigError, validate
from tests.library.test_dora import grads_of
from tests.tiny import gemma_backbone, gemma_inputs, randomize_lora, t5_backbone

np_ = keras.ops.convert_to_numpy


def _t5_inputs():
    rng = np.random.default_rng(1)
    ids = lambda: rng.integers(3, 64, (2, 7)).astype("int32")  # noqa: E731
    return {"encoder_token_ids": ids(), "encoder_padding_mask": np.ones((2, 7), "int32"),
            "decoder_token_ids": ids(), "decoder_padding_mask": np.ones((2, 7), "int32")}


CASES = {
    "gemma": (lambda: gemma_backbone(layers=2), gemma_inputs, lambda out: out, "decoder_block_"),
    "t5": (lambda: t5_backbone(layers=2), _t5_inputs, lambda out: out["decoder_sequence_output"],
           "transformer_"),
}


def _loss_and_grads(case, mode):
    make, inputs_of, output, _ = CASES[case]
    keras.utils.set_random_seed(0)
    backbone = make()
    changed = remat.remat_blocks(backbone) if mode == "blocks" else []
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, targets="all_linear"))
    randomize_lora(backbone, seed=2)
    inputs = inputs_of()
    target = np.random.default_rng(3).normal(size=np_(output(backbone(inputs))).shape).astype("float32")

    def loss():
        return keras.ops.mean(keras.ops.square(output(backbone(inputs, training=True)) - target))

    variables = backbone.trainable_weights
    return changed, float(np_(loss())), grads_of(loss, variables)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_remat_changes_no_number_and_wraps_only_the_blocks(case):
    _, loss_plain, grads_plain = _loss_and_grads(case, "none")
    changed, loss_remat, grads_remat = _loss_and_grads(case, "blocks")
    assert loss_remat == pytest.approx(loss_plain, rel=1e-6)
    for g, ref in zip(grads_remat, grads_plain):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7)
    assert all(name.startswith(CASES[case][3]) for name in changed), changed
    assert len(changed) == (2 if case == "gemma" else 4)  # 2 decoder blocks; T5: 2 encoder + 2 decoder layers


def test_blocks_are_recomputed_in_the_backward_pass():
    """JAX: the gradient's program holds a remat (checkpoint) region. TensorFlow: tf.recompute_grad runs
    each block's call again when the tape computes the gradient."""
    keras.utils.set_random_seed(0)
    backbone = gemma_backbone(layers=1)
    assert remat.remat_blocks(backbone) == ["decoder_block_0"] and remat.remat_blocks(backbone) == []  # once
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, targets="qv"))
    inputs = gemma_inputs()
    block = backbone.get_layer("decoder_block_0")
    variables = backbone.trainable_weights

    def loss():
        return keras.ops.sum(backbone(inputs, training=True))

    if keras.backend.backend() == "jax":
        import jax

        def f(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss()

        program = str(jax.make_jaxpr(jax.grad(f))([v.value for v in variables]))
        assert "remat" in program  # jax.checkpoint's primitive
    else:
        import tensorflow as tf

        calls = []
        attention = block.attention
        original = attention.call  # inside the block: runs again when the block is recomputed

        def counting(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        object.__setattr__(attention, "call", counting)
        with tf.GradientTape() as tape:
            value = loss()
        before = len(calls)
        tape.gradient(value, [v.value for v in variables])
        assert before == 1 and len(calls) == 2  # the backward pass ran the block's forward again


@pytest.mark.one_backend
def test_the_app_key_names_its_modes(compose):
    assert validate(compose([]))["trainer"]["remat"] == "none"
    assert validate(compose(["trainer.remat=full", "backend=tensorflow"]))["trainer"]["remat"] == "full"
    assert validate(compose(["trainer.remat=blocks"]))["trainer"]["remat"] == "blocks"  # the earlier name
    with pytest.raises(AppConfigError, match=r"trainer.remat=.everything. is not valid: it must be one of none, full, blocks"):
        validate(compose(["trainer.remat=everything"]))
