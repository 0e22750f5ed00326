"""lora3.peft_format: PEFT LoRA adapters written by lora3 and read by PEFT, written by PEFT and read by
lora3, with logits compared against PEFT on PyTorch (skipped when torch/peft/transformers are absent),
and the options lora3 cannot represent refused with the model left as it was.

Tiny Hugging Face models come from a config with random weights: Gemma and Gemma 3 are converted by
keras-hub's own transformers converters (`from_preset` on a `save_pretrained` directory); keras-hub
has no T5 converter, so `t5_pair` copies a Hugging Face T5's weights into a `T5Backbone` by hand.
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import keras

import lora3
from lora3.errors import AdapterError
from lora3.peft_format import (PEFT_BIN_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, is_peft_adapter,
                               load_peft_adapter, save_peft_adapter)
from lora3.surgery import lora_layers
from tests.tiny import gemma_backbone, randomize_lora, t5_backbone

VOCAB = 64
QV = {"t5": ["q", "v"], "gemma": ["q_proj", "v_proj"]}
ALL_LINEAR = {"t5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], "t5_relu": ["q", "k", "v", "o", "wi", "wo"],
              "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# (family, lora3 targets, PEFT target_modules, rank, alpha, rslora)
CASES = [
    ("t5", "qv", QV["t5"], 2, 4, False),
    ("t5", "all_linear", ALL_LINEAR["t5"], 4, 8, True),
    ("t5_relu", "all_linear", ALL_LINEAR["t5_relu"], 2, 3, False),
    ("gemma", "qv", QV["gemma"], 2, 4, False),
    ("gemma", "all_linear", ALL_LINEAR["gemma"], 4, 8, True),
    ("gemma3", "qv", QV["gemma"], 2, 4, False),
    ("gemma3", "all_linear", ALL_LINEAR["gemma"], 4, 8, True),
]
IDS = np.random.default_rng(0).integers(3, VOCAB, (2, 8)).astype("int32")
DEC_IDS = np.random.default_rng(1).integers(3, VOCAB, (2, 6)).astype("int32")


def rel(a, b):
    """Largest difference relative to the largest |logit|."""
    return float(np.max(np.abs(np.asarray(a, "float64") - b)) / np.max(np.abs(b)))


def weights_of(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in model.weights]


# -- Hugging Face side (torch) ---------------------------------------------------------------------------

def _hf():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    return torch, peft, transformers


def hf_config(family):
    _, _, transformers = _hf()
    if family.startswith("t5"):
        return transformers.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
            feed_forward_proj="relu" if family == "t5_relu" else "gated-relu", dropout_rate=0.0,
            tie_word_embeddings=False, decoder_start_token_id=0)
    if family == "gemma":
        return transformers.GemmaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=4, hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
        max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A saved tiny Hugging Face model per family (random weights, seeded)."""
    torch, _, transformers = _hf()
    classes = {"t5": transformers.T5ForConditionalGeneration, "t5_relu": transformers.T5ForConditionalGeneration,
               "gemma": transformers.GemmaForCausalLM, "gemma3": transformers.Gemma3ForCausalLM}
    dirs = {}
    for family, cls in classes.items():
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp(f"hf_{family}")
        cls(hf_config(family)).eval().save_pretrained(out, safe_serialization=True)
        dirs[family] = out
    return dirs


def hf_model(hf_dirs, family):
    _, _, transformers = _hf()
    cls = transformers.T5ForConditionalGeneration if family.startswith("t5") else transformers.AutoModelForCausalLM
    return cls.from_pretrained(hf_dirs[family]).eval()


def hf_logits(model, family):
    torch, _, _ = _hf()
    with torch.no_grad():
        if family.startswith("t5"):
            out = model(input_ids=torch.tensor(IDS, dtype=torch.long),
                        decoder_input_ids=torch.tensor(DEC_IDS, dtype=torch.long))
        else:
            out = model(torch.tensor(IDS, dtype=torch.long))
    return out.logits.numpy()


def t5_pair(hf_dirs, family):
    """A keras-hub `T5Backbone` holding the saved Hugging Face T5's weights (keras-hub has no T5 converter)."""
    hf = hf_model(hf_dirs, family)
    gated = family == "t5"
    # relu, gated or not: HF's "gated-gelu" is the tanh approximation, keras' "gelu" the exact one
    backbone = _t5_relu(gated)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    backbone.token_embedding.embeddings.assign(sd["shared.weight"])
    backbone.token_embedding.reverse_embeddings.assign(sd["lm_head.weight"].T)
    for stack, layers in (("encoder", backbone.encoder_transformer_layers),
                          ("decoder", backbone.decoder_transformer_layers)):
        for i, layer in enumerate(layers):
            p = f"{stack}.block.{i}.layer."
            blocks = [(layer.self_attention, layer.self_attention_layer_norm, "0", "SelfAttention")]
            if stack == "decoder":
                blocks.append((layer.cross_attention, layer.cross_attention_layer_norm, "1", "EncDecAttention"))
            for mha, norm, idx, name in blocks:
                for proj, short in ((mha.query_projector, "q"), (mha.key_projector, "k"),
                                    (mha.value_projector, "v"), (mha.output_projector, "o")):
                    proj.kernel.assign(sd[f"{p}{idx}.{name}.{short}.weight"].T)
                norm.weight.assign(sd[f"{p}{idx}.layer_norm.weight"])
            if i == 0:
                layer.self_attention.relative_attention_bias.assign(
                    sd[f"{p}0.SelfAttention.relative_attention_bias.weight"])
            ff = f"{p}{1 if stack == 'encoder' else 2}."
            layer.layer_norm.weight.assign(sd[ff + "layer_norm.weight"])
            if gated:
                layer.input_projector.kernel.assign(sd[ff + "DenseReluDense.wi_0.weight"].T)
                layer.gate_projector.kernel.assign(sd[ff + "DenseReluDense.wi_1.weight"].T)
            else:
                layer.input_projector.kernel.assign(sd[ff + "DenseReluDense.wi.weight"].T)
            layer.output_projector.kernel.assign(sd[ff + "DenseReluDense.wo.weight"].T)
    backbone.encoder_layer_norm.weight.assign(sd["encoder.final_layer_norm.weight"])
    backbone.decoder_layer_norm.weight.assign(sd["decoder.final_layer_norm.weight"])
    return backbone


def _t5_relu(gated):
    import keras_hub

    return keras_hub.models.T5Backbone(vocabulary_size=VOCAB, num_layers=2, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, key_value_dim=8, activation="relu",
                                       use_gated_activation=gated, tie_embedding_weights=False, dropout=0.0)


def keras_model(hf_dirs, family):
    """The keras-hub backbone with the Hugging Face model's weights."""
    import keras_hub

    if family.startswith("t5"):
        return t5_pair(hf_dirs, family)
    cls = keras_hub.models.GemmaBackbone if family == "gemma" else keras_hub.models.Gemma3Backbone
    return cls.from_preset(str(hf_dirs[family]))


def keras_logits(backbone, family):
    if family.startswith("t5"):
        out = backbone({"encoder_token_ids": IDS, "encoder_padding_mask": np.ones_like(IDS),
                        "decoder_token_ids": DEC_IDS, "decoder_padding_mask": np.ones_like(DEC_IDS)})
        hidden = out["decoder_sequence_output"]
    else:
        hidden = backbone({"token_ids": IDS, "padding_mask": np.ones_like(IDS)})
    return keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))


@pytest.mark.parametrize("family", ["t5", "t5_relu", "gemma", "gemma3"])
def test_the_base_models_agree(hf_dirs, family):
    """The comparisons below start from the same function."""
    assert rel(keras_logits(keras_model(hf_dirs, family), family), hf_logits(hf_model(hf_dirs, family), family)) < 1e-5


# -- export: lora3 writes, PEFT reads ------------------------------------------------------------------------

@pytest.mark.parametrize("family, targets, modules, rank, alpha, rslora", CASES)
def test_exported_adapter_gives_peft_the_same_logits(hf_dirs, tmp_path, family, targets, modules, rank, alpha,
                                                     rslora):
    _, peft, _ = _hf()
    backbone = keras_model(hf_dirs, family)
    base = keras_logits(backbone, family)
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=rank, alpha=alpha, targets=targets, rslora=rslora))
    randomize_lora(backbone, seed=3, scale=0.3)
    ours = keras_logits(backbone, family)
    assert rel(ours, base) > 1e-2  # the adapter changes the output
    path = save_peft_adapter(backbone, tmp_path / "peft", base_model_name_or_path="tiny/" + family)
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == sorted(modules)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (rank, alpha, rslora)
    assert config["base_model_name_or_path"] == "tiny/" + family

    pm = peft.PeftModel.from_pretrained(hf_model(hf_dirs, family), path).eval()
    adapted = [n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapted) == len(lora_layers(backbone))
    theirs = hf_logits(pm, family)
    print(f"export {family} {targets}: max relative logit difference {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) < 1e-4


def test_a_partial_selection_is_written_as_full_module_names(hf_dirs, tmp_path):
    """Only block 0 adapted: short names would adapt every block in PEFT, so the names are explicit."""
    _, peft, _ = _hf()
    backbone = keras_model(hf_dirs, "gemma")
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, alpha=4, targets="qv", layers=[0]))
    randomize_lora(backbone, seed=4, scale=0.3)
    path = save_peft_adapter(backbone, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    pm = peft.PeftModel.from_pretrained(hf_model(hf_dirs, "gemma"), path).eval()
    adapted = sorted(n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert adapted == ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.v_proj"]
    assert rel(keras_logits(backbone, "gemma"), hf_logits(pm, "gemma")) < 1e-4


def test_t5_cross_attention_alone(hf_dirs, tmp_path):
    _, peft, _ = _hf()
    backbone = keras_model(hf_dirs, "t5")
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=2, alpha=2, targets=r".*cross_attention/(query|output)_projector"))
    randomize_lora(backbone, seed=5, scale=0.3)
    path = save_peft_adapter(backbone, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert config["target_modules"] == [f"decoder.block.{i}.layer.1.EncDecAttention.{s}" for i in (0, 1) for s in "oq"]
    pm = peft.PeftModel.from_pretrained(hf_model(hf_dirs, "t5"), path).eval()
    assert rel(keras_logits(backbone, "t5"), hf_logits(pm, "t5")) < 1e-4


# -- import: PEFT writes, lora3 reads -------------------------------------------------------------------------

def peft_adapter(hf_dirs, family, directory, modules, rank, alpha, rslora, seed=0, **kw):
    """A PEFT adapter with random A and B (init_lora_weights=False), saved by PEFT; returns PEFT's logits."""
    torch, peft, _ = _hf()
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf_model(hf_dirs, family), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=modules, use_rslora=rslora, lora_dropout=0.0,
        init_lora_weights=False, **kw)).eval()
    pm.save_pretrained(directory)
    return hf_logits(pm, family)


@pytest.mark.parametrize("family, targets, modules, rank, alpha, rslora", CASES)
def test_peft_adapter_loads_with_the_same_logits(hf_dirs, tmp_path, family, targets, modules, rank, alpha, rslora):
    theirs = peft_adapter(hf_dirs, family, tmp_path / "peft", modules, rank, alpha, rslora)
    assert is_peft_adapter(tmp_path / "peft")
    backbone = keras_model(hf_dirs, family)
    report = load_peft_adapter(backbone, tmp_path / "peft", trainable=False)
    assert report.trainable_params == 0
    expected = {p for p in lora3.find_targets(keras_model(hf_dirs, family), targets)}
    assert {w.path for w in lora_layers(backbone)} == expected
    ours = keras_logits(backbone, family)
    print(f"import {family} {targets}: max relative logit difference {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) < 1e-4


def test_peft_layers_to_transform_and_bfloat16_tensors(hf_dirs, tmp_path):
    torch, _, _ = _hf()
    theirs = peft_adapter(hf_dirs, "gemma3", tmp_path / "peft", ["q_proj", "down_proj"], 2, 4, False,
                          layers_to_transform=[1])
    tensors = load_file(str(tmp_path / "peft" / PEFT_WEIGHTS_NAME))
    assert sorted(tensors) == sorted(f"base_model.model.model.layers.1.{m}.lora_{k}.weight"
                                     for m in ("self_attn.q_proj", "mlp.down_proj") for k in "AB")
    backbone = keras_model(hf_dirs, "gemma3")
    load_peft_adapter(backbone, tmp_path / "peft")
    assert [w.path for w in lora_layers(backbone)] == ["decoder_block_1/attention/query", "decoder_block_1/ffw_linear"]
    assert rel(keras_logits(backbone, "gemma3"), theirs) < 1e-4
    # the same tensors as bfloat16 (as many adapters are shared): read, widened to float32
    from safetensors.torch import save_file as torch_save

    bf16 = {k: torch.tensor(v).to(torch.bfloat16) for k, v in tensors.items()}
    torch_save(bf16, str(tmp_path / "peft" / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    again = keras_model(hf_dirs, "gemma3")
    load_peft_adapter(again, tmp_path / "peft")
    for w in lora_layers(again):
        a = keras.ops.convert_to_numpy(w.lora_A)
        key = [k for k in bf16 if ".lora_A." in k and (("q_proj" in k) == w.path.endswith("query"))][0]
        np.testing.assert_array_equal(a, bf16[key].float().numpy())


def _gemma_task():
    import keras_hub

    return keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(layers=1), preprocessor=None)


def test_round_trip_is_exact(tmp_path):
    for make, targets in ((lambda: t5_backbone(layers=1), "all_linear"), (lambda: gemma_backbone(layers=1), "qv"),
                          (_gemma_task, "mlp")):
        keras.utils.set_random_seed(0)
        model = make()
        lora3.apply_lora(model, lora3.LoraConfig(rank=2, alpha=3, targets=targets, rslora=True))
        randomize_lora(model, seed=6)
        path = save_peft_adapter(model, tmp_path / "peft")
        keras.utils.set_random_seed(0)
        fresh = make()
        load_peft_adapter(fresh, path)
        before = {w.path: (keras.ops.convert_to_numpy(w.lora_A), keras.ops.convert_to_numpy(w.lora_B))
                  for w in lora_layers(model)}
        after = {w.path: (keras.ops.convert_to_numpy(w.lora_A), keras.ops.convert_to_numpy(w.lora_B))
                 for w in lora_layers(fresh)}
        assert before.keys() == after.keys()
        for p in before:
            np.testing.assert_array_equal(before[p][0], after[p][0])
            np.testing.assert_array_equal(before[p][1], after[p][1])
        w = lora_layers(fresh)[0]
        assert (w.rank, w.alpha, w.rslora) == (2, 3.0, True)
        assert all(v.trainable for w in lora_layers(fresh) for v in (w.lora_A, w.lora_B))


def test_save_and_load_adapter_speak_both_formats(tmp_path):
    """`save_adapter(format="peft")` writes PEFT's files; `load_adapter` detects either format."""
    keras.utils.set_random_seed(0)
    model = gemma_backbone(layers=1)
    lora3.apply_lora(model, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear"))
    randomize_lora(model, seed=3)
    x = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}
    want = keras.ops.convert_to_numpy(model(x))
    peft_dir = lora3.save_adapter(model, tmp_path / "peft", format="peft", base_model_name_or_path="google/gemma-2b")
    assert sorted(os.listdir(peft_dir)) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
    assert json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())["base_model_name_or_path"] == "google/gemma-2b"
    own_dir = lora3.save_adapter(model, tmp_path / "own")
    for directory, fmt in ((peft_dir, None), (own_dir, None), (peft_dir, "peft"), (own_dir, "lora3")):
        keras.utils.set_random_seed(0)
        fresh = gemma_backbone(layers=1)
        lora3.load_adapter(fresh, directory, format=fmt)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(fresh(x)), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match=r"format='hf' is not an adapter format; use one of: lora3, peft"):
        lora3.save_adapter(model, tmp_path / "x", format="hf")
    with pytest.raises(AdapterError, match=r"format='hf' is not an adapter format"):
        lora3.load_adapter(gemma_backbone(layers=1), peft_dir, format="hf")
    assert not (tmp_path / "x").exists()


def test_a_peft_adapter_joins_a_model_as_a_named_adapter(tmp_path):
    """PEFT's files carry no adapter name: lora3 names it on load, beside the model's others, and
    writes any one of a model's adapters."""
    keras.utils.set_random_seed(0)
    model = gemma_backbone(layers=1)
    x = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}
    base = keras.ops.convert_to_numpy(model(x))
    lora3.apply_lora(model, lora3.LoraConfig(rank=2, alpha=4, targets="qv"))
    randomize_lora(model, seed=1)
    first = keras.ops.convert_to_numpy(model(x))
    keras.utils.set_random_seed(0)
    donor = gemma_backbone(layers=1)
    lora3.apply_lora(donor, lora3.LoraConfig(rank=4, alpha=4, targets="mlp"))
    randomize_lora(donor, seed=2)
    second = keras.ops.convert_to_numpy(donor(x))
    load_peft_adapter(model, save_peft_adapter(donor, tmp_path / "mlp"), adapter_name="mlp")
    assert lora3.adapter_names(model) == ["default", "mlp"] and lora3.active_adapter(model) == "default"
    assert not any(v.trainable for w in lora_layers(model) if "mlp" in w.adapter_names
                   for v in (w.get_adapter("mlp").lora_A, w.get_adapter("mlp").lora_B))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), first, rtol=1e-5, atol=1e-6)
    lora3.set_adapter(model, "mlp")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), second, rtol=1e-5, atol=1e-6)
    assert not np.allclose(second, base) and not np.allclose(first, base)
    # Either adapter written back in PEFT's format: the inactive one by name.
    for name, modules, want in (("default", ["q_proj", "v_proj"], first), ("mlp", ["down_proj", "gate_proj", "up_proj"], second)):
        path = save_peft_adapter(model, tmp_path / f"out_{name}", adapter_name=name)
        assert json.loads((tmp_path / f"out_{name}" / PEFT_CONFIG_NAME).read_text())["target_modules"] == modules
        keras.utils.set_random_seed(0)
        fresh = gemma_backbone(layers=1)
        load_peft_adapter(fresh, path)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(fresh(x)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="has no adapter 'nope'"):
        save_peft_adapter(model, tmp_path / "nope", adapter_name="nope")


def test_head_order_is_permuted_when_the_output_order_differs_from_the_kernel_order():
    """An EinsumDense whose output lists its dims in another order than its kernel: B is permuted."""
    from lora3.peft_format import _b_from_hf, _b_to_hf, _hf_order

    layer = keras.layers.EinsumDense("btd,ndh->bthn", output_shape=(None, 3, 2))
    layer.build((None, None, 5))
    order = _hf_order(layer)
    assert order == ((3, 2), (1, 0))
    b = np.arange(2 * 6, dtype="float32").reshape(2, 6)  # lora3: out index = h * 2 + n
    hf = _b_to_hf(b, order)  # HF: out index = n * 3 + h
    assert hf[1 * 3 + 2, 1] == b[1, 2 * 2 + 1]
    np.testing.assert_array_equal(_b_from_hf(hf, order), b)
    assert _hf_order(keras.layers.Dense(3)) is None


# -- refusals ----------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A valid PEFT adapter written from a tiny Gemma (all_linear), and a fresh model to load it into."""
    keras.utils.set_random_seed(0)
    model = gemma_backbone(layers=1)
    lora3.apply_lora(model, lora3.LoraConfig(rank=2, alpha=4, targets="all_linear"))
    randomize_lora(model, seed=7)
    path = tmp_path / "peft"
    save_peft_adapter(model, path)
    keras.utils.set_random_seed(0)
    return path, gemma_backbone(layers=1)


def edit_config(path, **changes):
    config = json.loads((path / PEFT_CONFIG_NAME).read_text())
    config.update(changes)
    (path / PEFT_CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(path, fn):
    tensors = load_file(str(path / PEFT_WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(path / PEFT_WEIGHTS_NAME))


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
REFUSED_CONFIGS = [
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"bias": "all"}, "bias='all'"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "has no lora_magnitude_vector tensor"),  # DoRA without its magnitudes
    ({"use_dora": "yes"}, "use_dora='yes'"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"rank_pattern": {"q_proj": 4}}, "q_proj.lora_A.weight' has shape \\(2, 16\\).*needs \\(4, 16\\) for r=4"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern=.*value 0 for 'q_proj'.*positive integer"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern=.*value 2.5"),
    ({"rank_pattern": {"([": 2}}, "rank_pattern=.*key '\\(\\['.*not a valid regex"),
    ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern=.*value -1.*positive number"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern=.*must be a mapping"),
    # "pissa" and "olora" load (lora3 redoes the init as PEFT does: tests/library/test_base_init.py)
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'.*cannot reproduce exactly"),
    ({"init_lora_weights": "corda"}, "init_lora_weights='corda'.*base weights"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
    ({"r": 0}, "rank must be a positive integer"),
    ({"r": "8"}, "r='8'"),
    ({"lora_alpha": None}, "lora_alpha=None"),
    ({"target_modules": ["q_proj"]}, "target_modules=\\['q_proj'\\] does not select"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
      "exclude_modules": ["down_proj"]}, "does not select"),
    ({"target_modules": "(["}, "not a valid regex"),
]


@pytest.mark.one_backend
@pytest.mark.parametrize("changes, message", REFUSED_CONFIGS, ids=[m for _, m in REFUSED_CONFIGS])
def test_unsupported_config_is_refused_and_the_model_is_unchanged(saved, changes, message):
    path, model = saved
    before = weights_of(model)
    edit_config(path, **changes)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(model, path)
    assert lora_layers(model) == []
    after = weights_of(model)
    assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


def _rename(old, new):
    def fn(t):
        t[new] = t.pop(old)
    return fn


REFUSED_TENSORS = [
    (lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((2, 64), "float32")}),
     "embedding adapter"),
    (lambda t: t.update({"base_model.model.lm_head.weight": np.zeros((64, 16), "float32")}), "not a LoRA weight"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                         np.zeros((16,), "float32")}), "DoRA"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": np.zeros((16,), "float32")}),
     "LoRA bias"),
    (_rename(Q_A, Q_A.replace("layers.0", "layers.5")), "not modules of this GemmaBackbone"),
    (lambda t: t.pop(Q_B), "has no lora_B.weight"),
    (lambda t: t.update({Q_A: np.zeros((3, 16), "float32")}), "has shape \\(3, 16\\).*needs \\(2, 16\\)"),
    (lambda t: t.update({Q_B: np.zeros((16, 2), "int32")}), "dtype I32"),
    (_rename(Q_A, Q_A.replace("lora_A.weight", "lora_A.default.weight")), "not a LoRA weight"),
    (_rename(Q_A, Q_A.replace("base_model.model.", "")), "does not start with"),
]


@pytest.mark.one_backend
@pytest.mark.parametrize("edit, message", REFUSED_TENSORS, ids=[m for _, m in REFUSED_TENSORS])
def test_unusable_tensors_are_refused_and_the_model_is_unchanged(saved, edit, message):
    path, model = saved
    before = weights_of(model)
    edit_tensors(path, edit)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(model, path)
    assert lora_layers(model) == []
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(model)))


@pytest.mark.one_backend
def test_pickled_bin_missing_files_and_a_model_with_lora_are_refused(saved, tmp_path):
    path, model = saved
    (path / PEFT_WEIGHTS_NAME).rename(path / PEFT_BIN_NAME)
    assert is_peft_adapter(path)
    with pytest.raises(AdapterError, match="adapter_model.bin.*convert it to adapter_model.safetensors"):
        load_peft_adapter(model, path)
    (path / PEFT_BIN_NAME).unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_peft_adapter(model, path)
    with pytest.raises(AdapterError, match="does not exist"):
        load_peft_adapter(model, tmp_path / "nowhere")
    (path / PEFT_CONFIG_NAME).write_text("{nope")
    (path / PEFT_WEIGHTS_NAME).write_bytes(b"")
    assert not is_peft_adapter(path)
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_peft_adapter(model, path)

    lora3.apply_lora(model, rank=2, targets="qv")
    other = tmp_path / "other"
    save_peft_adapter(model, other)
    with pytest.raises(AdapterError, match="already has an adapter named 'default'.*another adapter_name"):
        load_peft_adapter(model, other)
    assert len(lora_layers(model)) == 2 and lora3.adapter_names(model) == ["default"]


@pytest.mark.one_backend
@pytest.mark.parametrize("changes", [{"init_lora_weights": v} for v in (False, "gaussian", "eva", "orthogonal", "mica")]
                         + [{"fan_in_fan_out": True}, {"lora_dropout": 0.1, "inference_mode": False},
                            {"task_type": None, "target_modules": "all-linear"},
                            {"target_modules": r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"}])
def test_options_that_do_not_change_the_adapter_are_accepted(saved, changes):
    """Initialisation schemes only matter before training; PEFT sets fan_in_fan_out to false on nn.Linear."""
    path, model = saved
    edit_config(path, **changes)
    report = load_peft_adapter(model, path)
    assert len(report.rows) == 7
    if "lora_dropout" in changes:
        assert lora_layers(model)[0].dropout == 0.1


@pytest.mark.one_backend
def test_export_refusals(tmp_path):
    with pytest.raises(AdapterError, match="no LoRA layers"):
        save_peft_adapter(gemma_backbone(layers=1), tmp_path / "a")

    class Block(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.proj = keras.layers.Dense(4, name="proj")

        def call(self, x):
            return self.proj(x)

    plain = keras.Sequential([keras.Input((4,)), Block(name="block")])
    lora3.apply_lora(plain, rank=2, targets=".*proj")
    with pytest.raises(AdapterError, match="supported for T5Backbone, GemmaBackbone, Gemma3Backbone.*Sequential"):
        save_peft_adapter(plain, tmp_path / "b")
    with pytest.raises(AdapterError, match="supported for T5Backbone"):
        load_peft_adapter(plain, tmp_path / "b")

    class GemmaBackbone(keras.Model):  # a Gemma-named model with a projection Hugging Face Gemma lacks
        def __init__(self):
            x = keras.Input((4,))
            super().__init__(x, Block(name="decoder_block_0")(x))

    odd = GemmaBackbone()
    lora3.apply_lora(odd, rank=2, targets=".*proj")
    with pytest.raises(AdapterError, match=r"\['decoder_block_0/proj'\] have no Hugging Face module.*ffw_gating"):
        save_peft_adapter(odd, tmp_path / "c")
    assert not (tmp_path / "c").exists()

    model = gemma_backbone(layers=1)
    lora3.apply_lora(model, rank=2, alpha=4, targets="qv")
    odd_one = lora_layers(model)[1].get_adapter("default")
    odd_one.dropout = 0.1  # one layer with another dropout: PEFT has one for all modules
    with pytest.raises(AdapterError, match="dropout=0.1.*one dropout for all its modules"):
        save_peft_adapter(model, tmp_path / "d")
    odd_one.dropout = 0.0
    assert not (tmp_path / "d").exists()
    save_peft_adapter(model, tmp_path / "d")
    with pytest.raises(AdapterError, match="already exists"):
        save_peft_adapter(model, tmp_path / "d", overwrite=False)
    keys = sorted(load_file(str(tmp_path / "d" / PEFT_WEIGHTS_NAME)))
    assert keys == [Q_A, Q_B, Q_A.replace("q_proj", "v_proj"), Q_B.replace("q_proj", "v_proj")]
    shutil.rmtree(tmp_path / "d")
    assert not os.path.exists(tmp_path / "d")


# -- per-layer ranks and alphas (rank_pattern / alpha_pattern) ------------------------------------------------

RANK_PATTERN = {"q_proj": 4, r"layers\.1\.mlp\..*": 3}
ALPHA_PATTERN = {"down_proj": 9, "v_proj": 2}


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_peft_rank_and_alpha_patterns_load_with_the_same_logits(hf_dirs, tmp_path, family):
    _, peft, _ = _hf()
    theirs = peft_adapter(hf_dirs, family, tmp_path / "peft", ALL_LINEAR["gemma"], 2, 4, False,
                          rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    pm = peft.PeftModel.from_pretrained(hf_model(hf_dirs, family), tmp_path / "peft").eval()
    peft_ranks = {n[len("base_model.model."):]: (m.r["default"], m.lora_alpha["default"])
                  for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert {r for r, _ in peft_ranks.values()} == {2, 3, 4}  # the patterns took effect in PEFT
    backbone = keras_model(hf_dirs, family)
    report = load_peft_adapter(backbone, tmp_path / "peft", trainable=False)
    hf_name = {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
               "attention_output": "self_attn.o_proj", "ffw_gating": "mlp.gate_proj", "ffw_gating_2": "mlp.up_proj",
               "ffw_linear": "mlp.down_proj"}
    ours_ranks = {f"model.layers.{w.path.split('/')[0].rsplit('_', 1)[1]}.{hf_name[w.path.rsplit('/', 1)[1]]}":
                  (w.rank, w.alpha) for w in lora_layers(backbone)}
    assert ours_ranks == peft_ranks
    assert {r.rank for r in report.rows} == {2, 3, 4}
    ours = keras_logits(backbone, family)
    print(f"import {family} rank_pattern/alpha_pattern: max relative logit difference {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) < 1e-4


@pytest.mark.parametrize("family", ["gemma", "t5"])
def test_mixed_ranks_export_to_peft_with_the_same_logits(hf_dirs, tmp_path, family):
    _, peft, _ = _hf()
    backbone = keras_model(hf_dirs, family)
    if family == "t5":
        config = lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", exclude="o",
                                  rank_pattern={"query_projector": 4, "transformer_decoder_layer_1/.*": 3},
                                  alpha_pattern={"output_projector": 6})
    else:
        config = lora3.LoraConfig(rank=2, alpha=4, targets="all_linear", exclude="decoder_block_0/ffw_gating",
                                  rank_pattern={"query": 4, "decoder_block_1/ffw_.*": 3},
                                  alpha_pattern={"ffw_linear": 6, "value": 1})
    lora3.apply_lora(backbone, config)
    randomize_lora(backbone, seed=8, scale=0.3)
    ours = keras_logits(backbone, family)
    path = save_peft_adapter(backbone, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert (written["r"], written["lora_alpha"]) == (2, 4) and written["rank_pattern"] and written["alpha_pattern"]
    assert all(k.startswith(("model.layers.", "encoder.", "decoder.")) for k in written["rank_pattern"])
    pm = peft.PeftModel.from_pretrained(hf_model(hf_dirs, family), path).eval()
    adapted = {n: (m.r["default"], m.lora_alpha["default"])
               for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert sorted(adapted.values()) == sorted((w.rank, w.alpha) for w in lora_layers(backbone))
    theirs = hf_logits(pm, family)
    print(f"export {family} mixed ranks: max relative logit difference {rel(ours, theirs):.2e}")
    assert rel(ours, theirs) < 1e-4
    # and back: lora3 reads its own export into the same per-layer settings
    again = keras_model(hf_dirs, family)
    load_peft_adapter(again, path)
    assert [(w.path, w.rank, w.alpha) for w in lora_layers(again)] == \
        [(w.path, w.rank, w.alpha) for w in lora_layers(backbone)]
    assert rel(keras_logits(again, family), ours) < 1e-5
