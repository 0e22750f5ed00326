"""lora3 against PEFT on PyTorch, an independent implementation (skipped when peft is absent).

A tiny Hugging Face Gemma is converted by keras-hub's own HF converter; the same
LoRA weights are put into PEFT and into lora3; logits and parameter counts must agree.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import keras  # noqa: E402

import lora3  # noqa: E402

HF_TO_KERAS = {
    "self_attn.q_proj": "attention/query",
    "self_attn.k_proj": "attention/key",
    "self_attn.v_proj": "attention/value",
    "self_attn.o_proj": "attention/attention_output",
    "mlp.gate_proj": "ffw_gating",
    "mlp.up_proj": "ffw_gating_2",
    "mlp.down_proj": "ffw_linear",
}
GROUPS = {
    "qv": ["q_proj", "v_proj"],
    "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = transformers.GemmaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("hf_gemma")
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("targets, rank, rslora", [("qv", 2, False), ("all_linear", 4, True)])
def test_logits_and_counts_match_peft(hf_dir, targets, rank, rslora):
    import keras_hub

    hf = transformers.GemmaForCausalLM.from_pretrained(hf_dir).eval()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=GROUPS[targets], lora_dropout=0.0,
                             use_rslora=rslora, init_lora_weights=False)  # random B: a non-trivial adapter
    hf = peft.get_peft_model(hf, config).eval()
    peft_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)

    backbone = keras_hub.models.GemmaBackbone.from_preset(str(hf_dir))
    report = lora3.apply_lora(backbone, lora3.LoraConfig(rank=rank, alpha=2 * rank, targets=targets, rslora=rslora))
    assert report.lora_params == peft_trainable
    wrappers = {w.path: w for w in lora3.lora_layers(backbone)}
    copied = 0
    for name, module in hf.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        block = int(name.split(".layers.")[1].split(".")[0])
        leaf = ".".join(name.split(".")[-2:])
        w = wrappers[f"decoder_block_{block}/{HF_TO_KERAS[leaf]}"]
        w.lora_A.assign(module.lora_A["default"].weight.detach().numpy())  # (r, in): the same layout
        w.lora_B.assign(module.lora_B["default"].weight.detach().numpy().T)  # (out, r) -> (r, out)
        copied += 1
    assert copied == len(wrappers)

    ids = np.array([[2, 5, 9, 11, 7, 3, 4, 8]], "int32")
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    ours = keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    with torch.no_grad():
        with hf.disable_adapter():
            base = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - base).max() > 1e-3  # the adapter really changes the output
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
