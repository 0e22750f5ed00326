"""Several named adapters on one model (`lora3.adapter_set`): naming, switching, disabling, deleting,
combining (against PEFT on torch), saving, and compiled functions that never go stale."""

import json
import re
import warnings
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import lora3
from lora3.layers import LoRADense, LoRAEinsumDense
from lora3.surgery import STATE_ATTR, STATE_FILE, lora_state

IN, V_OUT, HEADS, HEAD_DIM = 8, 7, 2, 4  # cat of all three adapters (rank 7) fits every layer
OUT = V_OUT + HEADS * HEAD_DIM


def _np(x):
    return ops.convert_to_numpy(x)


@keras.saving.register_keras_serializable(package="lora3_multi_tests")
class Block(keras.layers.Layer):
    """`h = tanh(q(x))`, then `[v(h), up(h)]`: two Dense layers and an EinsumDense (2 heads)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.q = keras.layers.Dense(IN, name="q")
        self.v = keras.layers.Dense(V_OUT, name="v")
        self.up = keras.layers.EinsumDense("bd,dnh->bnh", output_shape=(HEADS, HEAD_DIM), bias_axes="nh", name="up")

    def build(self, input_shape):
        self.q.build(input_shape)
        self.v.build((input_shape[0], IN))
        self.up.build((input_shape[0], IN))

    def call(self, x):
        h = ops.tanh(self.q(x))
        return ops.concatenate([self.v(h), ops.reshape(self.up(h), (-1, HEADS * HEAD_DIM))], axis=-1)


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((IN,), name="x")  # named: an auto-numbered name would change the fingerprint
    return keras.Model(inputs, Block(name="block")(inputs), name="net")


def with_adapters(seed=0):
    """The model with three random adapters: a (q, v; r=2), b (q, up; r=2), c (v, up; r=3, rslora)."""
    model = make_model(seed)
    lora3.apply_lora(model, rank=2, alpha=4, targets="block/(q|v)", adapter_name="a")
    lora3.apply_lora(model, rank=2, alpha=3, targets="block/(q|up)", adapter_name="b")
    lora3.apply_lora(model, rank=3, alpha=6, rslora=True, targets="block/(v|up)", adapter_name="c")
    rng = np.random.default_rng(seed)
    for w in lora3.lora_layers(model):
        for name in w.adapter_names:
            adapter = w.get_adapter(name)
            adapter.lora_A.assign(rng.normal(0, 0.5, adapter.lora_A.shape).astype("float32"))
            adapter.lora_B.assign(rng.normal(0, 0.5, adapter.lora_B.shape).astype("float32"))
    return model


def base_matrices(model):
    """`{leaf: (W (in, out) matrix view, bias)}` of the block's three layers."""
    block = model.get_layer("block")
    out = {}
    for leaf in ("q", "v", "up"):
        layer = getattr(block, leaf)
        layer = getattr(layer, "wrapped", layer)
        out[leaf] = (_np(layer.kernel).reshape(IN, -1), _np(layer.bias).reshape(-1))
    return out


def reference(model, x, adapter=None, base=None):
    """The block's output in dense numpy, with `adapter`'s update where it has one (None: base alone)."""
    mats = dict(base or base_matrices(model))
    if adapter is not None:
        for w in lora3.lora_layers(model):
            if adapter in w.adapter_names:
                a = w.get_adapter(adapter)
                leaf = w.path.rsplit("/", 1)[1]
                W, b = mats[leaf]
                mats[leaf] = (W + a.scaling * _np(a.lora_A).T @ _np(a.lora_B), b)
    h = np.tanh(x @ mats["q"][0] + mats["q"][1])
    return np.concatenate([h @ mats["v"][0] + mats["v"][1], h @ mats["up"][0] + mats["up"][1]], axis=-1)


X = np.random.default_rng(42).normal(size=(5, IN)).astype("float32")


def test_variable_names_paths_and_what_trains():
    model = with_adapters()
    layers = {w.path: w for w in lora3.lora_layers(model)}
    assert sorted(layers) == ["block/q", "block/up", "block/v"]
    assert layers["block/q"].adapter_names == ["a", "b"] and layers["block/up"].adapter_names == ["b", "c"]
    assert isinstance(layers["block/up"], LoRAEinsumDense) and isinstance(layers["block/q"], LoRADense)
    assert [v.path for v in layers["block/q"].weights if "lora" in v.path] == [
        "block/q/lora_A_a", "block/q/lora_B_a", "block/q/lora_A_b", "block/q/lora_B_b"]
    assert lora3.adapter_names(model) == ["a", "b", "c"] and lora3.active_adapter(model) == "a"
    # Only the active adapter trains; the others were added frozen (as PEFT's add_adapter).
    assert sorted(v.path for v in model.trainable_weights) == [
        "block/q/lora_A_a", "block/q/lora_B_a", "block/v/lora_A_a", "block/v/lora_B_a"]
    # The active adapter's settings, as single-adapter code reads them.
    q = layers["block/q"]
    assert (q.rank, q.alpha, q.rslora, q.scaling, q.dropout) == (2, 4.0, False, 2.0, 0.0)
    assert q.lora_A is q.get_adapter("a").lora_A and tuple(q.lora_B.shape) == (2, IN)
    with pytest.raises(AttributeError, match="has no adapter 'a', the active one"):
        layers["block/up"].lora_A  # noqa: B018
    assert getattr(layers["block/up"], "lora_A", None) is None
    lora3.set_adapter(model, "c")
    up = layers["block/up"]
    assert (up.rank, up.rslora, up.scaling) == (3, True, pytest.approx(6 / np.sqrt(3)))
    assert sorted(v.path for v in model.trainable_weights) == [
        "block/up/lora_A_c", "block/up/lora_B_c", "block/v/lora_A_c", "block/v/lora_B_c"]


def test_default_adapter_keeps_its_plain_names():
    model = make_model()
    lora3.apply_lora(model, rank=2, targets="block/q")
    lora3.apply_lora(model, rank=1, targets="block/q", adapter_name="x")
    assert [v.path for v in model.weights if "lora" in v.path] == [
        "block/q/lora_A", "block/q/lora_B", "block/q/lora_A_x", "block/q/lora_B_x"]


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_only_the_active_adapter_runs(name):
    model = with_adapters()
    lora3.set_adapter(model, name)
    np.testing.assert_allclose(_np(model(X)), reference(model, X, name), rtol=1e-5, atol=1e-5)


def test_unknown_names_are_refused_with_the_list():
    model = with_adapters()
    for call in (lambda: lora3.set_adapter(model, "zz"), lambda: lora3.delete_adapter(model, "zz"),
                 lambda: lora3.save_adapter(model, "/tmp/never", adapter_name="zz"),
                 lambda: lora3.add_weighted_adapter(model, ["a", "zz"], [1, 1], "m")):
        with pytest.raises(lora3.Lora3Error, match="no adapter 'zz'.*a, b, c"):
            call()
    with pytest.raises(lora3.LoraConfigError, match="adapter name 'a.b' is not valid"):
        lora3.apply_lora(model, rank=1, targets="block/q", adapter_name="a.b")
    with pytest.raises(lora3.LoraConfigError, match="already has an adapter named 'b' \\(surgery applied twice\\)"):
        lora3.apply_lora(model, rank=1, targets="block/q", adapter_name="b")
    with pytest.raises(lora3.LoraConfigError, match="train_also=\\['bias'\\] is only available to a model's first"):
        lora3.apply_lora(model, rank=1, targets="block/q", adapter_name="d", train_also=["bias"])
    assert lora3.adapter_names(model) == ["a", "b", "c"]
    with pytest.raises(lora3.LoraConfigError, match="no lora3 adapters"):
        lora3.set_adapter(make_model(), "a")
    assert lora3.adapter_names(make_model()) == [] and lora3.active_adapter(make_model()) is None


def test_disable_adapters_gives_the_base_exactly_and_restores():
    model = make_model()
    base = _np(model(X))
    lora3.apply_lora(model, rank=2, alpha=4, targets="block/.*")
    lora3.apply_lora(model, rank=2, alpha=4, targets="block/v", adapter_name="b")
    for w in lora3.lora_layers(model):
        for n in w.adapter_names:
            w.get_adapter(n).lora_B.assign(np.full(w.get_adapter(n).lora_B.shape, 0.3, "float32"))
    adapted = _np(model(X))
    trainable = [v.path for v in model.trainable_weights]
    assert not np.allclose(adapted, base)
    with lora3.disable_adapters(model) as same:
        assert same is model
        np.testing.assert_array_equal(_np(model(X)), base)
        assert model.trainable_weights == []
        with lora3.disable_adapters(model):  # nested: nothing more
            np.testing.assert_array_equal(_np(model(X)), base)
        with pytest.raises(lora3.LoraConfigError, match="inside lora3.disable_adapters"):
            lora3.set_adapter(model, "b")
        np.testing.assert_array_equal(_np(model(X)), base)
    np.testing.assert_array_equal(_np(model(X)), adapted)
    assert [v.path for v in model.trainable_weights] == trainable
    with pytest.raises(RuntimeError, match="boom"):
        with lora3.disable_adapters(model):
            raise RuntimeError("boom")
    np.testing.assert_array_equal(_np(model(X)), adapted)
    assert [v.path for v in model.trainable_weights] == trainable


def test_delete_adapter_follows_peft():
    model = with_adapters()
    before = reference(model, X, "b")
    assert lora3.delete_adapter(model, "c") == "a"  # not the active one: nothing else changes
    assert lora3.adapter_names(model) == ["a", "b"]
    assert sorted(v.path for v in model.weights if "lora_A" in v.path) == [
        "block/q/lora_A_a", "block/q/lora_A_b", "block/up/lora_A_b", "block/v/lora_A_a"]
    # Deleting the active adapter activates the first remaining one in sorted order, with PEFT's warning.
    lora3.set_adapter(model, "a")
    with pytest.warns(UserWarning, match="Adapter a was active which is now deleted. Setting active adapter to b"):
        assert lora3.delete_adapter(model, "a") == "b"
    # block/v had only a and c: it is a plain Dense again, frozen while the model has LoRA.
    block = model.get_layer("block")
    assert type(block.v) is keras.layers.Dense and not block.v.trainable
    np.testing.assert_allclose(_np(model(X)), before, rtol=1e-5, atol=1e-5)
    assert sorted(v.path for v in model.trainable_weights) == [
        "block/q/lora_A_b", "block/q/lora_B_b", "block/up/lora_A_b", "block/up/lora_B_b"]
    with pytest.raises(lora3.LoraConfigError, match="'b' is the model's only adapter; lora3.unload"):
        lora3.delete_adapter(model, "b")
    # unload gives every layer back, trainable as before the surgery (also the released one).
    lora3.unload(model)
    assert all(v.trainable for v in model.weights) and block.v.trainable


def test_a_merged_adapter_cannot_be_deleted_and_set_adapter_unmerges():
    model = with_adapters()
    q = model.get_layer("block").q
    kernel = _np(q.wrapped.kernel).copy()
    q.merge()
    with pytest.raises(lora3.LoraConfigError, match="cannot delete adapter 'a' while it is merged"):
        lora3.delete_adapter(model, "a")
    with pytest.warns(UserWarning, match="unmerging it before switching adapters"):
        lora3.set_adapter(model, "b")
    assert not q.merged
    np.testing.assert_allclose(_np(q.wrapped.kernel), kernel, atol=1e-6)
    np.testing.assert_allclose(_np(model(X)), reference(model, X, "b"), rtol=1e-5, atol=1e-5)


def test_merge_and_unload_merges_the_active_adapter_only():
    model = with_adapters()
    lora3.set_adapter(model, "b")
    expected = reference(model, X, "b")
    lora3.merge_and_unload(model)
    assert not lora3.lora_layers(model) and lora_state(model) is None
    np.testing.assert_allclose(_np(model(X)), expected, rtol=1e-5, atol=1e-5)


def test_report_and_record_name_the_adapters():
    model = with_adapters()
    report = lora3.apply_lora(model, rank=1, alpha=1, targets="block/q", adapter_name="d")
    assert [r.path for r in report.rows] == ["block/q"] and report.rank == 1
    assert report.adapters == ("a", "b", "c", "d") and report.active_adapter == "a" and report.adapter_name == "d"
    assert str(report).splitlines()[-1] == "adapters: a (active), b, c, d; rows and rank: d"
    assert report.to_dict()["adapters"] == ["a", "b", "c", "d"] and report.to_dict()["active_adapter"] == "a"
    record = lora_state(model).record()
    assert record["active_adapter"] == "a" and [e["name"] for e in record["adapters"]] == ["a", "b", "c", "d"]
    assert record["config"]["rank"] == 2 and record["layer_paths"] == ["block/q", "block/v"]  # the active one's
    assert record["adapters"][2]["layer_paths"] == ["block/up", "block/v"]
    # One "default" adapter: the report and the record keep their single-adapter format.
    single = make_model()
    report = lora3.apply_lora(single, rank=2, targets="block/q")
    assert "adapters:" not in str(report) and "adapters" not in report.to_dict()
    assert set(lora_state(single).record()) == {"config", "layer_paths"}


def test_each_adapter_has_its_own_dropout():
    model = with_adapters()
    lora3.apply_lora(model, rank=2, alpha=2, dropout=0.5, targets="block/q", adapter_name="drop")
    q = model.get_layer("block").q
    assert q.lora_dropout is None and q.lora_dropout_drop.rate == 0.5
    tiny_b = q.get_adapter("drop").lora_B
    tiny_b.assign(np.full(tiny_b.shape, 0.5, "float32"))
    lora3.set_adapter(model, "drop")
    assert q.dropout == 0.5
    np.testing.assert_allclose(_np(model(X, training=False)), reference(model, X, "drop"), rtol=1e-5, atol=1e-5)
    assert not np.allclose(_np(model(X, training=True)), reference(model, X, "drop"), atol=1e-3)
    lora3.set_adapter(model, "a")  # a has no dropout: training changes nothing
    np.testing.assert_allclose(_np(model(X, training=True)), reference(model, X, "a"), rtol=1e-5, atol=1e-5)
    lora3.delete_adapter(model, "drop")
    assert not hasattr(q, "lora_dropout_drop") and not any(isinstance(l, keras.layers.Dropout) for l in q._layers)


def test_wrapper_config_round_trip_keeps_every_adapter():
    model = with_adapters()
    lora3.set_adapter(model, "c")
    up = model.get_layer("block").up
    clone = LoRAEinsumDense.from_config(up.get_config())
    assert clone.adapter_names == ["b", "c"] and clone.active_adapter == "c"
    assert (clone.get_adapter("c").rank, clone.get_adapter("c").rslora, clone.get_adapter("b").alpha) == (3, True, 3.0)
    clone.set_weights(up.get_weights())
    h = np.tanh(X)
    np.testing.assert_allclose(_np(clone(h)), _np(up(h)), rtol=1e-6, atol=1e-6)


def test_keras_file_keeps_both_adapters_and_the_active_one(tmp_path):
    model = with_adapters()
    lora3.set_adapter(model, "b")
    model.save(str(tmp_path / "m.keras"))
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        record = json.loads(archive.read(f"assets/{STATE_ATTR}/{STATE_FILE}"))
    assert record["active_adapter"] == "b"
    loaded = lora3.load_model(tmp_path / "m.keras")
    assert lora3.adapter_names(loaded) == ["a", "b", "c"] and lora3.active_adapter(loaded) == "b"
    for name in ("b", "a", "c"):
        lora3.set_adapter(loaded, name)
        lora3.set_adapter(model, name)
        np.testing.assert_allclose(_np(loaded(X)), _np(model(X)), rtol=1e-6, atol=1e-6)
    # After deletions the file still replays exactly (the remaining adapters, in order), also with
    # a layer given back (block/v had only a and c).
    lora3.set_adapter(model, "b")
    lora3.delete_adapter(model, "a")
    lora3.apply_lora(model, rank=1, targets="block/q", adapter_name="late")
    lora3.delete_adapter(model, "c")
    assert type(model.get_layer("block").v) is keras.layers.Dense
    model.save(str(tmp_path / "after_delete.keras"))
    again = lora3.load_model(tmp_path / "after_delete.keras")
    assert lora3.adapter_names(again) == ["b", "late"] and lora3.active_adapter(again) == "b"
    assert [v.path for v in again.weights] == [v.path for v in model.weights]
    np.testing.assert_allclose(_np(again(X)), _np(model(X)), rtol=1e-6, atol=1e-6)


def test_adapter_files_by_name(tmp_path):
    model = with_adapters()
    lora3.save_adapter(model, tmp_path / "b", adapter_name="b")
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert sorted(tensors) == ["block/q/lora_A", "block/q/lora_B", "block/up/lora_A", "block/up/lora_B"]
    assert tensors["block/up/lora_A"].shape == (IN, 2)  # the file's matrix view, whatever the name
    meta = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert meta["rank"] == 2 and meta["alpha"] == 3 and meta["layer_paths"] == ["block/q", "block/up"]
    expected = reference(model, X, "b")
    # Onto a fresh base as its first adapter (any name), and onto an adapted model as a new one.
    fresh = make_model()
    lora3.load_adapter(fresh, tmp_path / "b", adapter_name="mine")
    assert lora3.active_adapter(fresh) == "mine"
    np.testing.assert_allclose(_np(fresh(X)), expected, rtol=1e-5, atol=1e-5)
    other = make_model()
    lora3.apply_lora(other, rank=2, targets="block/v")
    lora3.load_adapter(other, tmp_path / "b", adapter_name="b")
    assert lora3.active_adapter(other) == "default"
    assert not any("lora_A_b" in v.path for v in other.trainable_weights)  # loaded inactive, frozen
    lora3.set_adapter(other, "b")
    np.testing.assert_allclose(_np(other(X)), expected, rtol=1e-5, atol=1e-5)
    # Loading under an existing name replaces that adapter's weights.
    lora3.save_adapter(model, tmp_path / "b2", adapter_name="b")
    lora3.load_adapter(other, tmp_path / "b2", adapter_name="b")
    np.testing.assert_allclose(_np(other(X)), expected, rtol=1e-5, atol=1e-5)
    # The active adapter is saved when no name is given.
    lora3.save_adapter(other, tmp_path / "active")
    assert json.loads((tmp_path / "active" / "adapter_config.json").read_text())["layer_paths"] == [
        "block/q", "block/up"]


def test_adapter_with_extra_weights_is_refused_as_a_second_adapter(tmp_path):
    model = make_model()
    lora3.apply_lora(model, rank=2, targets="block/q", train_also=["bias"])
    lora3.save_adapter(model, tmp_path / "train_also")
    model.get_layer("block").v.bias.trainable = True  # trainable without train_also: saved as an extra too
    lora3.merge_and_unload(model)
    plain = make_model()
    lora3.apply_lora(plain, rank=2, targets="block/q")
    plain.get_layer("block").v.bias.trainable = True
    lora3.save_adapter(plain, tmp_path / "extra")
    other = make_model()
    lora3.apply_lora(other, rank=2, targets="block/v")
    with pytest.raises(lora3.AdapterError, match="only available to a model's first adapter"):
        lora3.load_adapter(other, tmp_path / "train_also", adapter_name="x")
    with pytest.raises(lora3.AdapterError, match="carries weights outside LoRA"):
        lora3.load_adapter(other, tmp_path / "extra", adapter_name="x")
    assert lora3.adapter_names(other) == ["default"] and len(lora3.lora_layers(other)) == 1


# -- compiled functions and training ------------------------------------------------------------


def test_switching_adapters_never_leaves_a_stale_compiled_function():
    model = with_adapters()
    base = base_matrices(model)
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)

    def predicted():
        return model.predict(X, batch_size=len(X), verbose=0)

    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predicted(), reference(model, X, "a"), **tol)
    lora3.set_adapter(model, "b")
    np.testing.assert_allclose(predicted(), reference(model, X, "b"), **tol)
    with lora3.disable_adapters(model):
        np.testing.assert_allclose(predicted(), reference(model, X, None, base), **tol)
    np.testing.assert_allclose(predicted(), reference(model, X, "b"), **tol)
    lora3.add_weighted_adapter(model, ["a", "c"], [1.0, 0.5], "mix", combination="cat")
    lora3.set_adapter(model, "mix")
    np.testing.assert_allclose(predicted(), reference(model, X, "mix"), **tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lora3.delete_adapter(model, "mix") == "a"
    np.testing.assert_allclose(predicted(), reference(model, X, "a"), **tol)
    lora3.apply_lora(model, rank=1, targets="block/v", adapter_name="fresh")
    lora3.set_adapter(model, "fresh")  # B is zero: the base model, but for block/v's own layer
    np.testing.assert_allclose(predicted(), reference(model, X, None, base), **tol)


@pytest.mark.parametrize("switch", ["set_adapter", "disable_adapters"])
def test_look_alike_adapters_are_traced_again(switch):
    """Adapters x and y have the same layers and shapes, so the variables a compiled function takes
    look the same after a switch and JAX would reuse its trace as it is: only the reset makes the
    next predict trace the new choice."""
    model = make_model(3)
    base = base_matrices(model)
    lora3.apply_lora(model, rank=2, alpha=2, targets="block/q", adapter_name="x")
    lora3.apply_lora(model, rank=2, alpha=4, targets="block/q", adapter_name="y")
    rng = np.random.default_rng(3)
    for name in ("x", "y"):
        adapter = model.get_layer("block").q.get_adapter(name)
        adapter.lora_B.assign(rng.normal(0, 0.5, adapter.lora_B.shape).astype("float32"))
    # Frozen (inference): the trainable and frozen variable lists then keep their shapes whatever runs.
    lora3.set_adapter(model, "x", trainable=False)
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(X, verbose=0), reference(model, X, "x"), **tol)
    if switch == "set_adapter":
        lora3.set_adapter(model, "y", trainable=False)
        np.testing.assert_allclose(model.predict(X, verbose=0), reference(model, X, "y"), **tol)
    else:
        with lora3.disable_adapters(model):
            np.testing.assert_allclose(model.predict(X, verbose=0), reference(model, X, None, base), **tol)
    np.testing.assert_allclose(model.predict(X, verbose=0), reference(model, X, lora3.active_adapter(model)), **tol)


def test_fit_after_set_adapter_trains_only_the_active_adapter():
    model = with_adapters()
    y = np.random.default_rng(1).normal(size=(len(X), OUT)).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=True)

    def snapshot():
        return {id(v): (v.path, _np(v).copy()) for v in model.weights}

    def changed(before):
        return sorted(path for i, (path, value) in before.items()
                      if not np.array_equal(_np(next(v for v in model.weights if id(v) == i)), value))

    before = snapshot()
    model.fit(X, y, batch_size=len(X), epochs=2, verbose=0)
    assert changed(before) == ["block/q/lora_A_a", "block/q/lora_B_a", "block/v/lora_A_a", "block/v/lora_B_a"]
    optimizer_a = model.optimizer
    lora3.set_adapter(model, "b")
    before = snapshot()
    model.fit(X, y, batch_size=len(X), epochs=2, verbose=0)
    # Everything but b's variables is unchanged bit for bit: a, c and the frozen base.
    assert changed(before) == ["block/q/lora_A_b", "block/q/lora_B_b", "block/up/lora_A_b", "block/up/lora_B_b"]
    assert model.optimizer is not optimizer_a
    lora3.set_adapter(model, "a")
    assert model.optimizer is optimizer_a  # a's own optimizer (and its moments) come back
    before = snapshot()
    model.fit(X, y, batch_size=len(X), epochs=1, verbose=0)
    assert changed(before) == ["block/q/lora_A_a", "block/q/lora_B_a", "block/v/lora_A_a", "block/v/lora_B_a"]


# -- add_weighted_adapter --------------------------------------------------------------------------


def test_add_weighted_adapter_settings_and_refusals():
    model = with_adapters()
    report = lora3.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "lin", combination="linear")
    rec = lora_state(model).adapters["lin"].config
    assert (rec.rank, rec.alpha, rec.rslora) == (2, 2.0, False) and report.rank == 2
    assert [r.path for r in report.rows] == ["block/q", "block/up", "block/v"]  # every layer a or b adapts
    assert lora3.active_adapter(model) == "a" and not any("_lin" in v.path for v in model.trainable_weights)
    lora3.add_weighted_adapter(model, ["c", "a"], [1.0, 1.0], "cat", combination="cat")
    cat = lora_state(model).adapters["cat"].config
    assert (cat.rank, cat.alpha, cat.rslora) == (5, 5.0, True)  # rslora of the first adapter, as PEFT
    assert lora3.add_weighted_adapter(model, ["a", "c"], [1, 1], "svd").rank == 3  # svd by default, max rank
    with pytest.raises(lora3.LoraConfigError, match="needs adapters of one rank"):
        lora3.add_weighted_adapter(model, ["a", "c"], [1, 1], "x", combination="linear")
    with pytest.raises(lora3.LoraConfigError, match="already has an adapter named 'lin'"):
        lora3.add_weighted_adapter(model, ["a"], [1], "lin")
    with pytest.raises(lora3.LoraConfigError, match="2 adapters but 1 weights"):
        lora3.add_weighted_adapter(model, ["a", "b"], [1], "x")
    with pytest.raises(lora3.LoraConfigError, match="combination='ties' is not valid"):
        lora3.add_weighted_adapter(model, ["a", "b"], [1, 1], "x", combination="ties")
    with pytest.raises(lora3.LoraConfigError, match=re.escape("rank=9 is larger than layer 'block/q' allows")):
        lora3.add_weighted_adapter(model, ["a", "b"], [1, 1], "x", combination="svd", svd_rank=9)
    assert lora3.adapter_names(model) == ["a", "b", "c", "lin", "cat", "svd"]


def test_add_weighted_adapter_products_against_numpy():
    """The combined update per layer, from the definitions (cat and svd: the weighted sum itself)."""
    model = with_adapters()
    weights = {"a": 0.7, "b": -1.3, "c": 0.4}
    lora3.add_weighted_adapter(model, list(weights), list(weights.values()), "cat", combination="cat")
    # rank 5 holds every layer's weighted sum exactly (each layer has at most two adapters: 2 + 3).
    lora3.add_weighted_adapter(model, list(weights), list(weights.values()), "svd", combination="svd", svd_rank=5)
    lora3.add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "lin", combination="linear")
    for w in lora3.lora_layers(model):
        def update(name):
            a = w.get_adapter(name)
            return a.scaling * _np(a.lora_A).T @ _np(a.lora_B)
        total = sum(wt * update(n) for n, wt in weights.items() if n in w.adapter_names)
        np.testing.assert_allclose(update("cat"), total, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(update("svd"), total, rtol=1e-4, atol=1e-5)
        # linear: (sum sign_i sqrt|w_i s_i| A_i).T @ (sum sqrt|w_i s_i| B_i), PEFT's definition.
        ab = [(w.get_adapter(n), wt) for n, wt in (("a", 0.7), ("b", -1.3)) if n in w.adapter_names]
        A = sum(np.sign(wt * x.scaling) * np.sqrt(abs(wt * x.scaling)) * _np(x.lora_A) for x, wt in ab)
        B = sum(np.sqrt(abs(wt * x.scaling)) * _np(x.lora_B) for x, wt in ab)
        np.testing.assert_allclose(update("lin"), A.T @ B, rtol=1e-5, atol=1e-5)


class TorchBlock:
    """The same block in torch (built lazily: torch is optional)."""

    @staticmethod
    def make(torch, model):
        nn = torch.nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.v, self.up = nn.Linear(IN, IN), nn.Linear(IN, V_OUT), nn.Linear(IN, HEADS * HEAD_DIM)

            def forward(self, x):
                h = torch.tanh(self.q(x))
                return torch.cat([self.v(h), self.up(h)], dim=-1)

        net = Net()
        with torch.no_grad():
            for leaf, (W, b) in base_matrices(model).items():
                getattr(net, leaf).weight.copy_(torch.tensor(W.T))
                getattr(net, leaf).bias.copy_(torch.tensor(b))
        return net


PEFT_CASES = [
    ("linear", ["a", "b"], [0.7, -0.4], None),
    ("linear", ["c"], [1.5], None),  # one adapter: linear, rslora kept
    ("cat", ["a", "c"], [1.0, -0.5], None),
    ("cat", ["c", "a"], [0.8, 0.3], None),  # rslora first: the new adapter's scaling is sqrt(r), as PEFT
    ("svd", ["a", "b", "c"], [0.6, -1.0, 0.5], None),
    ("svd", ["a", "c"], [1.0, 0.7], 2),
]


@pytest.mark.parametrize("combination, names, weights, svd_rank", PEFT_CASES,
                         ids=[f"{c[0]}-{'+'.join(c[1])}" for c in PEFT_CASES])
def test_add_weighted_adapter_matches_peft(combination, names, weights, svd_rank):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    model = with_adapters()
    net = TorchBlock.make(torch, model)
    specs = {"a": dict(r=2, lora_alpha=4, target_modules=["q", "v"]),
             "b": dict(r=2, lora_alpha=3, target_modules=["q", "up"]),
             "c": dict(r=3, lora_alpha=6, use_rslora=True, target_modules=["v", "up"])}
    pm = None
    for name, spec in specs.items():
        config = peft.LoraConfig(lora_dropout=0.0, init_lora_weights=False, **spec)
        if pm is None:
            pm = peft.get_peft_model(net, config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
    modules = {n.rsplit(".", 1)[-1]: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and n.endswith(("q", "v", "up"))}
    with torch.no_grad():
        for w in lora3.lora_layers(model):
            module = modules[w.path.rsplit("/", 1)[1]]
            assert sorted(module.lora_A.keys()) == sorted(w.adapter_names)
            for name in w.adapter_names:
                a = w.get_adapter(name)
                module.lora_A[name].weight.copy_(torch.tensor(_np(a.lora_A)))  # (r, in): the same layout
                module.lora_B[name].weight.copy_(torch.tensor(_np(a.lora_B).T))  # (out, r)
    # The two sides agree before combining.
    pm.set_adapter("c")
    lora3.set_adapter(model, "c")
    with torch.no_grad():
        np.testing.assert_allclose(pm(torch.tensor(X)).numpy(), _np(model(X)), rtol=1e-5, atol=1e-5)

    pm.add_weighted_adapter(names, weights, "mix", combination_type=combination, svd_rank=svd_rank)
    lora3.add_weighted_adapter(model, names, weights, "mix", combination=combination, svd_rank=svd_rank)
    pm.set_adapter("mix")
    lora3.set_adapter(model, "mix")
    for w in lora3.lora_layers(model):
        module = modules[w.path.rsplit("/", 1)[1]]
        # The mix adapts the layers its adapters adapt, on both sides.
        assert ("mix" in w.adapter_names) == ("mix" in module.lora_A)
        if "mix" not in w.adapter_names:
            continue
        a = w.get_adapter("mix")
        assert (a.rank, a.scaling) == (module.r["mix"], pytest.approx(module.scaling["mix"]))
        ours = _np(w.delta_weight("mix")).reshape(IN, -1)  # the products: sign-free, unlike SVD factors
        theirs = module.get_delta_weight("mix").detach().numpy().T
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        theirs = pm(torch.tensor(X)).numpy()
        with pm.disable_adapter():
            base = pm(torch.tensor(X)).numpy()
    ours = _np(model(X))
    assert np.abs(theirs - base).max() > 1e-2  # the mix really changes the output
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
