"""Fuzz the adapter loader: any mutation of the files raises AdapterError, nothing else."""

import json

import keras
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora3
import tiny
from lora3.adapters import CONFIG_NAME, WEIGHTS_NAME
from lora3.fileio import sha256_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    keras.utils.set_random_seed(0)
    bb = tiny.t5_backbone(layers=1)
    lora3.apply_lora(bb, lora3.LoraConfig(rank=2, targets="qv"))
    tiny.randomize_lora(bb)
    lora3.save_adapter(bb, tmp / "adapter")
    target = tiny.t5_backbone(layers=1)
    return (tmp / "adapter" / CONFIG_NAME).read_bytes(), (tmp / "adapter" / WEIGHTS_NAME).read_bytes(), target


def _load(tmp_path, config_bytes, weight_bytes, model):
    d = tmp_path / "a"
    d.mkdir(exist_ok=True)
    (d / CONFIG_NAME).write_bytes(config_bytes)
    (d / WEIGHTS_NAME).write_bytes(weight_bytes)
    try:
        lora3.load_adapter(model, d)
    except lora3.AdapterError:
        pass
    else:
        lora3.merge_and_unload(model)  # a valid mutation (e.g. a no-op): undo for the next example
    assert not lora3.lora_layers(model)


# The loader checks files before any backend op; one pass is enough for the fuzz budget.
pytestmark = pytest.mark.one_backend

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@SETTINGS
@given(data=st.data())
def test_mutated_weight_bytes(saved, tmp_path_factory, data):
    config, weights, model = saved
    pos = data.draw(st.integers(0, len(weights) - 1))
    cut = data.draw(st.booleans())
    mutated = weights[:pos] if cut else weights[:pos] + bytes([weights[pos] ^ data.draw(st.integers(1, 255))]) + weights[pos + 1:]
    # Also with a matching sha256, so the safetensors parser itself is exercised.
    meta = json.loads(config)
    tmp = tmp_path_factory.mktemp("w")
    (tmp / "probe").write_bytes(mutated)
    meta["sha256"] = sha256_file(tmp / "probe")
    for cfg in (config, json.dumps(meta).encode()):
        _load(tmp, cfg, mutated, model)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


@SETTINGS
@given(key=st.sampled_from(["rank", "alpha", "rslora", "dropout", "targets", "layer_paths", "base_class",
                            "base_fingerprint", "lora3_version", "sha256", "init", "layers", "train_also",
                            "format_version", "extra_weights"]),
       value=JSON_VALUES, drop=st.booleans())
def test_mutated_config_fields(saved, tmp_path_factory, key, value, drop):
    config, weights, model = saved
    meta = json.loads(config)
    if drop:
        meta.pop(key, None)
    else:
        meta[key] = value
    _load(tmp_path_factory.mktemp("c"), json.dumps(meta).encode(), weights, model)


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_random_config_bytes(saved, tmp_path_factory, raw):
    _, weights, model = saved
    _load(tmp_path_factory.mktemp("r"), raw, weights, model)
