"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") against PEFT's `use_dora=True`.

Outputs and gradients of A, B and the magnitude are compared with PEFT on PyTorch for a biased
Dense / `nn.Linear` pair and for tiny Hugging Face Gemma and T5 models converted to keras-hub
(skipped when torch/peft/transformers are absent); the rest (magnitude init, merge, adapter files,
`.keras` files, refusals) runs on keras alone.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import keras

import lora3
from lora3.errors import AdapterError, LoraConfigError
from lora3.layers import LoRADense, LoRAEinsumDense
from lora3.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, _b_to_hf, _hf_order, load_peft_adapter, save_peft_adapter
from lora3.surgery import lora_layers
from tests.library.test_peft_format import _hf, hf_config, hf_logits, hf_model, keras_logits, keras_model, rel
from tests.tiny import backend, t5_backbone, t5_inputs

np_ = keras.ops.convert_to_numpy


def grads_of(loss_fn, variables):
    """Gradients of `loss_fn()` with respect to keras `variables` (numpy), on JAX or TensorFlow."""
    if backend() == "jax":
        import jax

        def f(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn()

        return [np.asarray(g) for g in jax.grad(f)([v.value for v in variables])]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = loss_fn()
    return [np.asarray(g) for g in tape.gradient(loss, [v.value for v in variables])]


def randomize(model, seed=0):
    """Random A, B and a magnitude 0.5x-1.5x its initial value, on every DoRA layer."""
    rng = np.random.default_rng(seed)
    for w in lora_layers(model):
        w.lora_A.assign(rng.normal(0, 0.3, w.lora_A.shape).astype("float32"))
        w.lora_B.assign(rng.normal(0, 0.3, w.lora_B.shape).astype("float32"))
        m = np_(w.lora_magnitude)
        w.lora_magnitude.assign((m * rng.uniform(0.5, 1.5, m.shape)).astype("float32"))


def rel_grad(a, b):
    return float(np.max(np.abs(np.asarray(a, "float64") - b)) / max(np.max(np.abs(b)), 1e-12))


# -- the config -------------------------------------------------------------------------------------------------

def test_config_field():
    assert "dora" not in lora3.LoraConfig().to_dict()  # existing adapter configs stay byte-identical
    cfg = lora3.LoraConfig(dora=True)
    assert cfg.to_dict()["dora"] is True and lora3.LoraConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(LoraConfigError, match="dora must be true or false"):
        lora3.LoraConfig(dora="yes")


# -- one layer: magnitude init, merge, keras-only ---------------------------------------------------------------

def einsum_layer():
    q = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 4, 8), bias_axes="nh")
    q.build((None, None, 16))
    q.bias.assign(np.random.default_rng(0).normal(size=(4, 8)).astype("float32"))
    return q


@pytest.mark.parametrize("kind", ["dense", "einsum"])
def test_magnitude_init_merge_unmerge_and_config(kind):
    if kind == "dense":
        layer = keras.layers.Dense(6)
        layer.build((None, 5))
        wrapper, x = LoRADense(layer, rank=2, alpha=4, dora=True), np.random.default_rng(1).normal(size=(3, 5))
        matrix = np_(layer.kernel)
    else:
        layer = einsum_layer()
        wrapper, x = LoRAEinsumDense(layer, rank=2, alpha=4, dora=True), np.random.default_rng(1).normal(size=(2, 3, 16))
        matrix = np_(layer.kernel).transpose(1, 0, 2).reshape(16, 32)
    x = x.astype("float32")
    np.testing.assert_allclose(np_(wrapper.lora_magnitude), np.linalg.norm(matrix, axis=0), rtol=1e-6)
    np.testing.assert_allclose(np_(wrapper(x)), np_(layer(x)), atol=1e-5)  # m = ||W||, B = 0: unchanged
    assert [v.path.split("/")[-1] for v in wrapper.trainable_weights] == ["lora_A", "lora_B", "lora_magnitude"]
    rng = np.random.default_rng(2)
    wrapper.lora_B.assign(rng.normal(0, 0.3, wrapper.lora_B.shape).astype("float32"))
    wrapper.lora_magnitude.assign(np_(wrapper.lora_magnitude) * rng.uniform(0.5, 1.5, wrapper.out_features))
    # the definition: (m / ||W + s A.T B||) * x @ (W + s A.T B) + b
    full = matrix + wrapper.scaling * np_(wrapper.lora_A).T @ np_(wrapper.lora_B)
    factor = np_(wrapper.lora_magnitude) / np.linalg.norm(full, axis=0)
    flat = x.reshape(-1, wrapper.in_features) @ (full * factor) + np_(layer.bias).reshape(-1)
    y = np_(wrapper(x))
    np.testing.assert_allclose(y.reshape(flat.shape), flat, rtol=1e-4, atol=1e-5)
    kernel = np_(layer.kernel).copy()
    wrapper.merge()
    np.testing.assert_allclose(np_(wrapper(x)), y, rtol=1e-5, atol=1e-5)
    wrapper.unmerge()
    np.testing.assert_allclose(np_(layer.kernel), kernel, atol=1e-5)
    np.testing.assert_allclose(np_(wrapper(x)), y, rtol=1e-5, atol=1e-5)
    clone = type(wrapper).from_config(wrapper.get_config())
    assert clone.dora and clone.get_adapter().settings()["dora"]


def test_dora_wrapper_with_a_plain_adapter_beside_it():
    layer = keras.layers.Dense(4)
    layer.build((None, 3))
    wrapper = LoRADense(layer, rank=1, alpha=1)
    assert "dora" not in wrapper.get_config() and wrapper.lora_magnitude is None
    wrapper.add_adapter("d", rank=1, alpha=1, dora=True)
    assert wrapper.get_adapter("d").lora_magnitude.path.endswith("lora_magnitude_d")
    assert len(wrapper.trainable_weights) == 2
    wrapper.set_adapter("d")
    assert len(wrapper.trainable_weights) == 3


# -- keras-hub model: adapter files, merge_and_unload, .keras, refusals -------------------------------------------

def t5_base():
    keras.utils.set_random_seed(0)
    return t5_backbone()


def t5_dora():
    backbone = t5_base()
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", dora=True))
    randomize(backbone, seed=3)
    return backbone


def t5_out(backbone):
    return np_(backbone(t5_inputs())["decoder_sequence_output"])


def test_adapter_file_round_trip_and_refusals(tmp_path):
    backbone = t5_dora()
    y = t5_out(backbone)
    path = lora3.save_adapter(backbone, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["dora"] is True
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert sum(k.endswith("/lora_magnitude") for k in tensors) == len(lora_layers(backbone))
    fresh = t5_base()
    lora3.load_adapter(fresh, path)
    assert rel(t5_out(fresh), y) < 1e-6
    # a DoRA file without its magnitudes is refused, the model left unchanged
    del tensors[next(k for k in tensors if k.endswith("/lora_magnitude"))]
    save_file(tensors, tmp_path / "a" / "adapter.safetensors", metadata={"format": "lora3"})
    from lora3.fileio import sha256_file

    meta["sha256"] = sha256_file(tmp_path / "a" / "adapter.safetensors")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    other = t5_base()
    with pytest.raises(AdapterError, match="lacks tensor"):
        lora3.load_adapter(other, path)
    assert not lora_layers(other)


def test_merge_and_unload_and_keras_file(tmp_path):
    backbone = t5_dora()
    y = t5_out(backbone)
    backbone.save(tmp_path / "m.keras")
    loaded = lora3.load_model(tmp_path / "m.keras")
    assert rel(t5_out(loaded), y) < 1e-6
    assert all(w.dora for w in lora_layers(loaded))
    merged = lora3.merge_and_unload(backbone)
    assert not lora_layers(merged)
    assert rel(t5_out(merged), y) < 1e-5


def test_add_weighted_adapter_refuses_dora():
    backbone = t5_dora()
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", dora=True), adapter_name="b")
    for combination in ("linear", "cat", "svd"):
        with pytest.raises(LoraConfigError, match="DoRA"):
            lora3.add_weighted_adapter(backbone, ["default", "b"], [1.0, 1.0], "c", combination=combination)
    assert lora3.adapter_names(backbone) == ["default", "b"]


# -- against PEFT ----------------------------------------------------------------------------------------------

def test_dense_with_bias_matches_peft_outputs_and_gradients():
    torch, peft, _ = _hf()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 5, bias=True)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    net = Net()
    dense = keras.layers.Dense(5)
    dense.build((None, 6))
    dense.kernel.assign(net.lin.weight.detach().numpy().T)
    dense.bias.assign(net.lin.bias.detach().numpy())
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lin"], use_dora=True,
                                                  init_lora_weights=False))
    layer = pm.base_model.model.lin
    # PEFT's magnitude init, ||W + s * B @ A|| (B is random here): from_weights without a magnitude
    wrapper = LoRADense.from_weights(dense, layer.lora_A["default"].weight.detach().numpy(),
                                     layer.lora_B["default"].weight.detach().numpy().T, alpha=3, dora=True)
    np.testing.assert_allclose(np_(wrapper.lora_magnitude),
                               layer.lora_magnitude_vector["default"].weight.detach().numpy(), rtol=1e-6)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.tensor(rng.uniform(0.5, 1.5, 5), dtype=torch.float32))
    wrapper.lora_A.assign(layer.lora_A["default"].weight.detach().numpy())
    wrapper.lora_B.assign(layer.lora_B["default"].weight.detach().numpy().T)
    wrapper.lora_magnitude.assign(layer.lora_magnitude_vector["default"].weight.detach().numpy())
    x = rng.normal(size=(4, 6)).astype("float32")
    r = rng.normal(size=(4, 5)).astype("float32")
    out = pm(torch.tensor(x))
    (out * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(np_(wrapper(x)), out.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = grads_of(lambda: keras.ops.sum(wrapper(x) * r), [wrapper.lora_A, wrapper.lora_B, wrapper.lora_magnitude])
    theirs = [layer.lora_A["default"].weight.grad.numpy(), layer.lora_B["default"].weight.grad.numpy().T,
              layer.lora_magnitude_vector["default"].weight.grad.numpy()]
    for ours, them in zip(g, theirs):
        assert rel_grad(ours, them) < 1e-4


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch, _, transformers = _hf()
    dirs = {}
    for family, cls in (("t5", transformers.T5ForConditionalGeneration), ("gemma", transformers.GemmaForCausalLM)):
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp(f"hf_{family}")
        cls(hf_config(family)).eval().save_pretrained(out, safe_serialization=True)
        dirs[family] = out
    return dirs


@pytest.mark.parametrize("family", ["t5", "gemma"])
def test_export_matches_peft_logits_and_gradients(hf_dirs, tmp_path, family):
    torch, peft, _ = _hf()
    backbone = keras_model(hf_dirs, family)
    base = keras_logits(backbone, family)
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", dora=True))
    assert rel(keras_logits(backbone, family), base) < 1e-5
    randomize(backbone, seed=5)
    ours = keras_logits(backbone, family)
    path = save_peft_adapter(backbone, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert config["use_dora"] is True
    keys = load_file(tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(lora_layers(backbone))

    pm = peft.PeftModel.from_pretrained(hf_model(hf_dirs, family), path, is_trainable=True).eval()
    theirs = hf_logits(pm, family)
    print(f"dora export {family}: max relative logit difference {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) < 1e-4

    # one SGD step's gradients of sum(logits * R), for every A, B and magnitude
    weights = np.random.default_rng(7).normal(size=ours.shape).astype("float32")
    pm.zero_grad()
    if family == "t5":
        import tests.library.test_peft_format as tpf

        out = pm(input_ids=torch.tensor(tpf.IDS, dtype=torch.long),
                 decoder_input_ids=torch.tensor(tpf.DEC_IDS, dtype=torch.long)).logits
    else:
        import tests.library.test_peft_format as tpf

        out = pm(torch.tensor(tpf.IDS, dtype=torch.long)).logits
    (out * torch.tensor(weights)).sum().backward()
    wrappers = lora_layers(backbone)
    variables = [v for w in wrappers for v in (w.lora_A, w.lora_B, w.lora_magnitude)]
    loss = lambda: keras.ops.sum(_logits_tensor(backbone, family) * weights)  # noqa: E731
    grads = grads_of(loss, variables)
    from lora3.peft_format import _model_sites, _family_of

    fam, bb = _family_of(backbone)
    sites = _model_sites(backbone, fam, bb, [w.path for w in wrappers])
    modules = dict(pm.named_modules())
    worst = 0.0
    for i, w in enumerate(wrappers):
        module = modules["base_model.model." + sites[w.path].hf]
        ga, gb, gm = grads[3 * i: 3 * i + 3]
        order = _hf_order(w.wrapped)
        pairs = [(ga, module.lora_A["default"].weight.grad.numpy()),
                 (_b_to_hf(gb, order), module.lora_B["default"].weight.grad.numpy()),
                 (_b_to_hf(gm[None, :], order)[:, 0], module.lora_magnitude_vector["default"].weight.grad.numpy())]
        for mine, them in pairs:
            worst = max(worst, rel_grad(mine, them))
    print(f"dora export {family}: max relative gradient difference {worst:.2e}")
    assert worst < 1e-4


def _logits_tensor(backbone, family):
    import tests.library.test_peft_format as tpf

    if family == "t5":
        out = backbone({"encoder_token_ids": tpf.IDS, "encoder_padding_mask": np.ones_like(tpf.IDS),
                        "decoder_token_ids": tpf.DEC_IDS, "decoder_padding_mask": np.ones_like(tpf.DEC_IDS)})
        hidden = out["decoder_sequence_output"]
    else:
        hidden = backbone({"token_ids": tpf.IDS, "padding_mask": np.ones_like(tpf.IDS)})
    return backbone.token_embedding(hidden, reverse=True)


@pytest.mark.parametrize("family", ["t5", "gemma"])
def test_peft_dora_adapter_loads_with_the_same_logits(hf_dirs, tmp_path, family):
    torch, peft, _ = _hf()
    modules = ["q", "v", "wo"] if family == "t5" else ["q_proj", "o_proj", "down_proj"]
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf_model(hf_dirs, family), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=modules, use_dora=True, init_lora_weights=False)).eval()
    # PEFT's magnitude init is ||W|| per output feature; scale it so the magnitudes matter
    with torch.no_grad():
        for name, module in pm.named_modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                weight = module.lora_magnitude_vector["default"].weight
                weight.mul_(1 + 0.3 * torch.rand_like(weight))
    pm.save_pretrained(tmp_path / "peft")
    theirs = hf_logits(pm, family)
    backbone = keras_model(hf_dirs, family)
    load_peft_adapter(backbone, tmp_path / "peft")
    assert all(w.dora for w in lora_layers(backbone))
    ours = keras_logits(backbone, family)
    print(f"dora import {family}: max relative logit difference {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) < 1e-4


def test_peft_dora_file_without_use_dora_is_refused(hf_dirs, tmp_path):
    torch, peft, _ = _hf()
    pm = peft.get_peft_model(hf_model(hf_dirs, "t5"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"],
                                                                      use_dora=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / PEFT_CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["use_dora"] = False
    config_path.write_text(json.dumps(config))
    backbone = keras_model(hf_dirs, "t5")
    with pytest.raises(AdapterError, match="DoRA magnitude"):
        load_peft_adapter(backbone, tmp_path / "peft")
    assert not lora_layers(backbone)
