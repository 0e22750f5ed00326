"""The bench workers' model preparation, in this process: it depends on the backend, so it runs in both passes."""

import os

BACKEND = "jax"


def test_frozen_floor_trains_one_norm_per_stack():
    """The floor setup: every weight frozen but the first norm scale of the encoder and the decoder,
    so its step runs the whole input-gradient backward and (almost) no weight gradient."""
    os.environ.setdefault("KERAS_BACKEND", BACKEND)
    from lora3.bench.setups import keras_worker

    spec = {"model": "tiny", "seed": 0, "setup": "frozen-floor"}
    model = keras_worker.build_model(spec)
    assert keras_worker.prepare(spec, model) == 0
    trainable = sorted(v.path for v in model.trainable_weights)
    assert len(trainable) == 2, trainable
    assert trainable[0].startswith("transformer_decoder_layer_0/") and "layer_norm" in trainable[0]
    assert trainable[1].startswith("transformer_encoder_layer_0/") and "layer_norm" in trainable[1]


def test_keras_own_lora_on_gemma_adapts_query_and_value_only():
    os.environ.setdefault("KERAS_BACKEND", BACKEND)
    from lora3.bench.setups import keras_worker

    spec = {"model": "gemma3_tiny", "seed": 0, "setup": "keras-qv", "rank": 2, "alpha": 4.0}
    model = keras_worker.build_model(spec)
    assert keras_worker.prepare(spec, model) == 2 * 2  # 2 layers x (query, value)
    trainable = sorted(v.path for v in model.trainable_weights)
    assert trainable and all(p.split("/")[-2] in ("query", "value") and "lora" in p for p in trainable), trainable
