"""`lora3.saving`: whole-model `.keras` files of adapted models (the surgery travels as an asset
of the archive, written by keras' own saving; no `get_config` is patched)."""

import json
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import lora3
import tiny
from lora3.surgery import STATE_ATTR, STATE_FILE

RECORD = f"assets/{STATE_ATTR}/{STATE_FILE}"


def _np(x):
    return keras.ops.convert_to_numpy(x)


@keras.saving.register_keras_serializable(package="lora3_tests")
class Block(keras.layers.Layer):
    """A Dense (tanh) then an EinsumDense splitting the features into 2 heads: plain keras."""

    def __init__(self, units=6, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.up = keras.layers.Dense(units, activation="tanh", name="up")
        self.proj = keras.layers.EinsumDense("bd,dnh->bnh", output_shape=(2, units // 2), name="proj")

    def build(self, input_shape):
        self.up.build(input_shape)
        self.proj.build((input_shape[0], self.units))

    def call(self, x):
        return ops.reshape(self.proj(self.up(x)), (-1, self.units))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def block_model():
    # Functional, not Sequential: a Sequential built from a list names its layers' paths under
    # its own name ("block/up"), the same Sequential rebuilt from its config does not
    # ("block/up"), so recorded layer paths would not find their layers again.
    inputs = keras.Input((5,))
    return keras.Model(inputs, Block(name="block")(inputs), name="net")


def adapted_block_model(seed=0, **config):
    keras.utils.set_random_seed(seed)
    model = block_model()
    lora3.apply_lora(model, lora3.LoraConfig(**{"rank": 2, "alpha": 4, "targets": r"block/.*", **config}))
    tiny.randomize_lora(model, seed=seed, scale=0.5)
    return model


def numpy_reference(model, x):
    """The adapted Block's output from its weights, in dense numpy."""
    wrappers = {w.path: w for w in lora3.lora_layers(model)}
    up, proj = wrappers["block/up"], wrappers["block/proj"]
    W, b = _np(up.wrapped.kernel), _np(up.wrapped.bias)
    h = np.tanh(x @ W + b + up.scaling * (x @ _np(up.lora_A).T) @ _np(up.lora_B))
    K = _np(proj.wrapped.kernel)  # (d, n, h): the matrix view is (d, n*h)
    return h @ (K.reshape(K.shape[0], -1) + proj.scaling * _np(proj.lora_A).T @ _np(proj.lora_B))


def test_whole_model_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(3)
    lm = tiny.gemma_lm()
    lora3.apply_lora(lm, lora3.LoraConfig(rank=2, targets="attention"))
    tiny.randomize_lora(lm)
    lm.save(str(tmp_path / "m.keras"))
    loaded = lora3.load_model(tmp_path / "m.keras")
    assert len(lora3.lora_layers(loaded)) == len(lora3.lora_layers(lm))
    x = tiny.gemma_inputs(vocab=lm.backbone.vocabulary_size)
    np.testing.assert_allclose(_np(loaded.backbone(x)), _np(lm.backbone(x)), rtol=1e-6, atol=1e-6)


def test_the_surgery_travels_as_an_asset_not_a_patched_get_config(tmp_path):
    model = adapted_block_model(train_also=["bias"])
    assert "get_config" not in vars(model)  # nothing patched on the instance
    assert '"lora3":' not in json.dumps(model.get_config())
    model.save(str(tmp_path / "m.keras"))
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        record = json.loads(archive.read(RECORD))
        assert "lora3" not in json.loads(archive.read("config.json"))["config"]
    assert record["layer_paths"] == ["block/proj", "block/up"]
    assert record["config"] == lora3.LoraConfig(rank=2, alpha=4, targets=r"block/.*", train_also=["bias"]).to_dict()


def test_plain_keras_round_trip_against_numpy(tmp_path):
    model = adapted_block_model(seed=1, train_also=["bias"])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(1).normal(size=(4, 5)).astype("float32")
    expected = numpy_reference(model, x)
    np.testing.assert_allclose(_np(model(x)), expected, rtol=1e-5, atol=1e-5)
    model.save(str(tmp_path / "m.keras"))

    loaded = lora3.load_model(tmp_path / "m.keras")
    assert [type(w).__name__ for w in lora3.lora_layers(loaded)] == ["LoRAEinsumDense", "LoRADense"]
    np.testing.assert_allclose(_np(loaded(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numpy_reference(loaded, x), expected, rtol=1e-6, atol=1e-6)
    # The surgery's freezing is replayed: LoRA and train_also=bias train, nothing else.
    assert sorted(v.path for v in loaded.trainable_weights) == [
        "block/proj/lora_A", "block/proj/lora_B", "block/up/bias", "block/up/lora_A",
        "block/up/lora_B"]
    assert loaded.compiled and loaded.optimizer is not None
    assert not lora3.load_model(tmp_path / "m.keras", compile=False).compiled
    # The loaded model carries its record too: saved again, it loads again.
    loaded.save(str(tmp_path / "again.keras"))
    np.testing.assert_allclose(_np(lora3.load_model(tmp_path / "again.keras")(x)), expected, rtol=1e-5, atol=1e-5)


def test_model_without_lora_loads_as_keras_would(tmp_path):
    keras.utils.set_random_seed(2)
    model = block_model()
    model.save(str(tmp_path / "plain.keras"))
    x = np.ones((2, 5), "float32")
    loaded = lora3.load_model(tmp_path / "plain.keras")
    assert not lora3.lora_layers(loaded)
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), rtol=1e-6)


def test_after_merge_the_file_is_stock_keras(tmp_path):
    model = adapted_block_model(seed=4)
    x = np.ones((2, 5), "float32")
    expected = numpy_reference(model, x)
    lora3.merge_and_unload(model)
    model.save(str(tmp_path / "merged.keras"))
    with zipfile.ZipFile(tmp_path / "merged.keras") as archive:
        assert RECORD not in archive.namelist()
    stock = keras.saving.load_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(_np(stock(x)), expected, rtol=1e-5, atol=1e-5)


def test_unreadable_files_raise_adapter_error(tmp_path):
    (tmp_path / "text.keras").write_text("not a zip")
    with pytest.raises(lora3.AdapterError, match="is not a .keras archive"):
        lora3.load_model(tmp_path / "text.keras")
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(lora3.AdapterError, match="has no readable config.json"):
        lora3.load_model(tmp_path / "empty.keras")
    model = adapted_block_model()
    model.save(str(tmp_path / "m.keras"))
    with zipfile.ZipFile(tmp_path / "m.keras") as src, zipfile.ZipFile(tmp_path / "bad.keras", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b'{"config": {"rank": -1}}' if name == RECORD else src.read(name))
    with pytest.raises(lora3.AdapterError, match=f"{RECORD} is not a readable lora3 record: rank must be"):
        lora3.load_model(tmp_path / "bad.keras")
