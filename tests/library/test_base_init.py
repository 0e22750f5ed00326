"""PiSSA and OLoRA (`init="pissa" | "pissa_niter_<N>" | "olora"`): against PEFT's `init_lora_weights`.

The PEFT comparisons (skipped without torch/peft/transformers) use the same tiny Hugging Face T5 and
Gemma as the PEFT-format tests: after the init both models compute the base model's logits, and after
one SGD step on the same loss they compute the same logits again (this holds whatever signs each
LAPACK gives the singular / QR directions, see `lora3.layers.base_init`). The rest checks lora3's
own guarantees against a numpy SVD: residual + update = base, adapter files that rebuild the residual
on the original base, unload giving the base back, and the refusals.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import keras

import lora3
from lora3.errors import AdapterError, LoraConfigError
from lora3.layers import LoRADense, LoRAEinsumDense
from lora3.peft_format import PEFT_CONFIG_NAME, save_peft_adapter
from lora3.surgery import lora_layers
from tests.library.test_dora import _logits_tensor, grads_of, hf_dirs  # noqa: F401 (hf_dirs: the fixture)
from tests.library.test_peft_format import _hf, hf_logits, hf_model, keras_logits, keras_model, rel
from tests.tiny import t5_backbone, t5_inputs

np_ = keras.ops.convert_to_numpy
INITS = ["pissa", "olora"]


# -- one layer, against numpy --------------------------------------------------------------------------------

def dense_layer(seed=0):
    layer = keras.layers.Dense(6, use_bias=True)
    layer.build((None, 8))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.normal(size=(8, 6)).astype("float32"))
    layer.bias.assign(rng.normal(size=(6,)).astype("float32"))
    return layer


def einsum_layer(seed=0):
    q = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 2, 4), bias_axes=None)
    q.build((None, None, 8))
    q.kernel.assign(np.random.default_rng(seed).normal(size=(2, 8, 4)).astype("float32"))
    return q


@pytest.mark.parametrize("kind", ["dense", "einsum"])
def test_pissa_is_the_top_singular_part_and_the_residual_keeps_the_output(kind):
    layer = dense_layer() if kind == "dense" else einsum_layer()
    cls = LoRADense if kind == "dense" else LoRAEinsumDense
    x = np.random.default_rng(1).normal(size=(3, 8) if kind == "dense" else (2, 3, 8)).astype("float32")
    y = np_(layer(x))
    wrapper = cls(layer, rank=3, alpha=6, init="pissa")
    a, b, s = np_(wrapper.lora_A), np_(wrapper.lora_B), wrapper.scaling
    # the original kernel as the (in, out) matrix, rebuilt from the residual the layer now holds
    original = np_(wrapper.kernel_matrix()) + s * a.T @ b
    u, sv, vt = np.linalg.svd(original, full_matrices=False)
    np.testing.assert_allclose(s * a.T @ b, (u[:, :3] * sv[:3]) @ vt[:3], atol=2e-5)   # best rank-3 part
    np.testing.assert_allclose(np.linalg.norm(a, axis=1) ** 2, sv[:3] / s, rtol=1e-5)  # sqrt(S/s) each
    np.testing.assert_allclose(np_(wrapper(x)), y, atol=2e-5)                        # outputs unchanged
    assert wrapper.get_adapter().rewrites_base


def test_olora_factors_are_qr_and_pissa_niter_approaches_pissa():
    layer = dense_layer()
    kernel = np_(layer.kernel).copy()
    wrapper = LoRADense(layer, rank=3, alpha=3, init="olora")
    b = np_(wrapper.lora_B)  # rows: the first 3 columns of Q of W.T, orthonormal
    np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
    q, r = np.linalg.qr(kernel.T)
    np.testing.assert_allclose(np.abs(np_(wrapper.lora_A)), np.abs(r[:3]), atol=1e-5)  # R's rows up to sign
    np.testing.assert_allclose(np_(layer.kernel) + wrapper.scaling * np_(wrapper.lora_A).T @ b, kernel, atol=1e-5)

    keras.utils.set_random_seed(0)
    exact = LoRADense(dense_layer(), rank=2, alpha=2, init="pissa")
    approx = LoRADense(dense_layer(), rank=2, alpha=2, init="pissa_niter_8")
    product = lambda w: np_(w.lora_A).T @ np_(w.lora_B)  # noqa: E731
    assert np.abs(product(approx) - product(exact)).max() < 1e-2 * np.abs(product(exact)).max()
    np.testing.assert_allclose(np_(approx.kernel_matrix()) + product(approx), kernel, atol=1e-5)


# -- a keras-hub model: files, merge, unload, .keras ----------------------------------------------------------

def t5_base():
    keras.utils.set_random_seed(0)
    return t5_backbone()


def t5_out(backbone):
    return np_(backbone(t5_inputs())["decoder_sequence_output"])


def trained(init, **kw):
    """A T5 with a `init` adapter whose A and B moved (as training would move them)."""
    backbone = t5_base()
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", init=init, **kw))
    rng = np.random.default_rng(3)
    for w in lora_layers(backbone):
        w.lora_A.assign(np_(w.lora_A) + rng.normal(0, 0.2, w.lora_A.shape).astype("float32"))
        w.lora_B.assign(np_(w.lora_B) + rng.normal(0, 0.2, w.lora_B.shape).astype("float32"))
    return backbone


@pytest.mark.parametrize("init", INITS)
def test_adapter_file_rebuilds_the_residual_on_the_original_base(tmp_path, init):
    base = t5_out(t5_base())
    backbone = trained(init)
    y = t5_out(backbone)
    assert rel(y, base) > 1e-2  # the adapter matters
    path = lora3.save_adapter(backbone, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["init"] == init and meta["base_residual"] is True
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert sum(k.endswith("/lora_A_init") for k in tensors) == len(lora_layers(backbone))
    fresh = t5_base()
    lora3.load_adapter(fresh, path)
    assert rel(t5_out(fresh), y) < 1e-5
    # merge_and_unload: residual + update, the trained model; unload: the base again
    assert rel(t5_out(lora3.merge_and_unload(backbone)), y) < 1e-5
    assert rel(t5_out(lora3.unload(fresh)), base) < 1e-5


def test_keras_file_keeps_the_residual_and_refuses_what_needs_the_factors(tmp_path):
    backbone = trained("pissa")
    y = t5_out(backbone)
    backbone.save(tmp_path / "m.keras")
    loaded = lora3.load_model(tmp_path / "m.keras")
    assert rel(t5_out(loaded), y) < 1e-6  # the init did not run again over the loaded kernels
    with pytest.raises(AdapterError, match="factors it started from are unknown"):
        lora3.save_adapter(loaded, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    kernels = [np_(w.wrapped.kernel).copy() for w in lora_layers(loaded)]
    with pytest.raises(LoraConfigError, match="cannot be restored"):
        lora3.unload(loaded)
    assert lora_layers(loaded) and all(np.array_equal(np_(w.wrapped.kernel), k)
                                       for w, k in zip(lora_layers(loaded), kernels))
    assert rel(t5_out(lora3.merge_and_unload(loaded)), y) < 1e-5  # merging needs no factors


def test_combinations_lora3_does_not_support_are_refused_unchanged(tmp_path):
    backbone = trained("olora")
    weights = [np_(v).copy() for v in backbone.weights]
    with pytest.raises(LoraConfigError, match="left residuals in the base kernels"):
        lora3.apply_lora(backbone, rank=2, targets="qv", adapter_name="b")
    with pytest.raises(LoraConfigError, match="keeps residuals in the base kernels"):
        with lora3.disable_adapters(backbone):
            pass
    plain = t5_base()
    lora3.apply_lora(plain, rank=2, targets="qv")
    plain_weights = [np_(v).copy() for v in plain.weights]
    with pytest.raises(LoraConfigError, match="rewrites the base kernels that the model's adapter"):
        lora3.apply_lora(plain, rank=2, targets="qv", init="pissa", adapter_name="b")
    path = lora3.save_adapter(backbone, tmp_path / "a")
    with pytest.raises(AdapterError, match="load it onto a fresh base model"):
        lora3.load_adapter(backbone, path)
    assert all(np.array_equal(np_(v), w) for v, w in zip(backbone.weights, weights))
    assert all(np.array_equal(np_(v), w) for v, w in zip(plain.weights, plain_weights))
    assert lora3.adapter_names(plain) == ["default"]


@pytest.mark.one_backend
def test_unknown_inits_are_refused_naming_the_valid_ones():
    for bad in ("pisa", "pissa_niter_", "pissa_niter_x", "olora_2", "corda", "loftq"):
        with pytest.raises(LoraConfigError, match="pissa_niter_<N>"):
            lora3.LoraConfig(init=bad)
    assert lora3.LoraConfig(init="pissa_niter_0").init == "pissa_niter_0"


def test_quantized_kernels_are_refused():
    layer = keras.layers.Dense(4)
    layer.build((None, 8))
    layer.quantize("int8")
    with pytest.raises(LoraConfigError, match="quantized"):
        LoRADense(layer, rank=2, alpha=2, init="pissa")


# -- against PEFT ---------------------------------------------------------------------------------------------

MODULES = {"t5": ["q", "v", "wo"], "gemma": ["q_proj", "o_proj", "down_proj"]}
TARGETS = {"t5": ["q", "v", "down"], "gemma": ["q", "o", "down"]}
LR = {"t5": 5e-4, "gemma": 0.5}  # steps that move the logits by 20%-90% (T5) and ~20% (Gemma)


def _peft_sgd_step(pm, family, weights):
    import tests.library.test_peft_format as tpf

    torch, _, _ = _hf()
    pm.zero_grad()
    if family == "t5":
        out = pm(input_ids=torch.tensor(tpf.IDS, dtype=torch.long),
                 decoder_input_ids=torch.tensor(tpf.DEC_IDS, dtype=torch.long)).logits
    else:
        out = pm(torch.tensor(tpf.IDS, dtype=torch.long)).logits
    (out * torch.tensor(weights)).sum().backward()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p -= LR[family] * p.grad


def _lora3_sgd_step(backbone, family, weights):
    variables = [v for w in lora_layers(backbone) for v in (w.lora_A, w.lora_B)]
    grads = grads_of(lambda: keras.ops.sum(_logits_tensor(backbone, family) * weights), variables)
    for v, g in zip(variables, grads):
        v.assign(np_(v) - LR[family] * g)


@pytest.mark.parametrize("family", ["t5", "gemma"])
@pytest.mark.parametrize("init", INITS)
def test_init_and_one_sgd_step_match_peft(hf_dirs, tmp_path, family, init):
    torch, peft, _ = _hf()
    backbone = keras_model(hf_dirs, family)
    base = keras_logits(backbone, family)
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, alpha=4, targets=TARGETS[family], init=init))
    ours = keras_logits(backbone, family)
    pm = peft.get_peft_model(hf_model(hf_dirs, family), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=MODULES[family], init_lora_weights=init))
    theirs = hf_logits(pm, family)
    assert rel(ours, base) < 1e-5 and rel(theirs, base) < 1e-5
    weights = np.random.default_rng(7).normal(size=base.shape).astype("float32")
    _lora3_sgd_step(backbone, family, weights)
    _peft_sgd_step(pm, family, weights)
    ours, theirs = keras_logits(backbone, family), hf_logits(pm, family)
    print(f"{init} {family}: one SGD step moved the logits by {rel(ours, base):.2e}; "
          f"lora3 vs PEFT {rel(ours, theirs):.2e}")
    assert rel(ours, base) > 1e-2
    assert rel(ours, theirs) < 1e-4

    # the export is PEFT's conversion: a rank-2r LoRA adapter of the *original* base
    path = save_peft_adapter(backbone, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["init_lora_weights"] is True
    converted = peft.PeftModel.from_pretrained(hf_model(hf_dirs, family), path).eval()
    assert rel(hf_logits(converted, family), ours) < 1e-4

    # PEFT's own PiSSA/OLoRA file (init_lora_weights="pissa"): PEFT redoes the init on load, so does lora3
    pm.save_pretrained(tmp_path / "native")
    again = keras_model(hf_dirs, family)
    lora3.load_adapter(again, tmp_path / "native")
    assert rel(keras_logits(again, family), theirs) < 1e-4
