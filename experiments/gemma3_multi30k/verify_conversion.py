"""Checks lora3's GGUF -> keras-hub conversion of Gemma 3 270M against an independent implementation:
transformers' own GGUF loader (PyTorch, float32) on the same file.

    KERAS_BACKEND=jax python experiments/gemma3_multi30k/verify_conversion.py --out verify_jax.json
    KERAS_BACKEND=tensorflow python experiments/gemma3_multi30k/verify_conversion.py --out verify_tensorflow.json

Three checks, each written to the JSON file:
1. logits: keras-hub `Gemma3Backbone` + reversed embedding against `Gemma3ForCausalLM` on a
   batch of Multi30K prompts (BOS added, as the Hugging Face tokenizer does); max relative error
   per prompt = max |keras - torch| / max |torch| over the prompt's positions and vocabulary.
2. tokenizer: the keras-hub tokenizer's ids against the Hugging Face tokenizer's (built by
   transformers from the GGUF's fields) on every line of the validation split, German and English.
3. generation: greedy `generate()` against transformers' greedy `generate()` on 20 prompts; the
   completion's first line compared as text.
Needs the `gemma3` and `peft` extras (gguf, transformers, accelerate, torch).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX512")  # torch's MKL runs at half speed here without it

import numpy as np  # noqa: E402

TEMPLATE = "Translate German to English: {source}\nEnglish:"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/multi30k")
    ap.add_argument("--out", required=True)
    ap.add_argument("--logit-prompts", type=int, default=8)
    ap.add_argument("--generate-prompts", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=96, help="prompt + completion tokens in generation")
    args = ap.parse_args()

    import keras
    import keras_hub
    import torch
    import transformers

    from lora3.run import gemma3_gguf

    torch.set_grad_enabled(False)
    gguf_path = gemma3_gguf.packaged_gguf()
    preset = gemma3_gguf.ensure_preset(gguf_path)
    rows = [json.loads(line)["translation"] for line in open(Path(args.data) / "valid.jsonl", encoding="utf-8")]
    t0 = time.perf_counter()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                           dtype=torch.float32).eval()
    causal = keras_hub.models.Gemma3CausalLM.from_preset(str(preset))
    causal.compile(sampler="greedy")
    kh_tok = causal.preprocessor.tokenizer
    result = {"backend": keras.backend.backend(), "gguf": str(gguf_path), "preset": str(preset),
              "keras_hub": keras_hub.__version__, "transformers": transformers.__version__,
              "params_keras": int(causal.backbone.count_params()),
              "params_torch": int(sum(p.numel() for p in hf.parameters())), "load_seconds": time.perf_counter() - t0}

    # 2. tokenizer ids on every validation line
    mismatches = {}
    for lang in ("de", "en"):
        texts = [r[lang] for r in rows]
        ours = kh_tok(texts)
        ours = ours.to_list() if hasattr(ours, "to_list") else [list(x) for x in ours]
        theirs = [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if [int(v) for v in a] != list(b)]
        mismatches[lang] = {"lines": len(texts), "mismatched": len(bad), "first": bad[:5]}
    result["tokenizer"] = mismatches

    # 1. logits on a batch of prompts
    prompts = [TEMPLATE.format(source=r["de"]) for r in rows[: args.logit_prompts]]
    enc = [hf_tok(p)["input_ids"] for p in prompts]  # BOS first
    length = max(map(len, enc))
    ids = np.zeros((len(enc), length), "int32")
    mask = np.zeros((len(enc), length), "int32")
    for i, e in enumerate(enc):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    hidden = causal.backbone({"token_ids": ids, "padding_mask": mask})
    ours = keras.ops.convert_to_numpy(causal.backbone.token_embedding(hidden, reverse=True)).astype("float64")
    theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy().astype("float64")
    per_prompt = []
    for i, e in enumerate(enc):
        a, b = ours[i, : len(e)], theirs[i, : len(e)]
        per_prompt.append(float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
    result["logits"] = {"prompts": len(prompts), "max_rel_error": max(per_prompt), "per_prompt": per_prompt,
                        "argmax_agree": float(np.mean([(ours[i, : len(e)].argmax(-1) == theirs[i, : len(e)].argmax(-1)).mean()
                                                       for i, e in enumerate(enc)]))}

    # 3. greedy generation
    newline = int(kh_tok.token_to_id("\n"))
    stops = [int(kh_tok.end_token_id), newline, int(kh_tok.token_to_id("<end_of_turn>"))]
    gen_prompts = [TEMPLATE.format(source=r["de"]) for r in rows[: args.generate_prompts]]
    pairs = []
    for p in gen_prompts:  # one max_length for all prompts: generate compiles once
        out = causal.generate([p], max_length=args.max_length, stop_token_ids=stops, strip_prompt=True)[0]
        ours_text = (out.decode() if isinstance(out, bytes) else str(out)).split("\n")[0].strip()
        x = hf_tok(p, return_tensors="pt")
        # the same total length as keras-hub's max_length (BOS + prompt + completion), so a completion
        # that never stops is cut at the same token by both
        g = hf.generate(**x, max_new_tokens=args.max_length - x["input_ids"].shape[1], do_sample=False,
                        eos_token_id=stops)
        theirs_text = hf_tok.decode(g[0, x["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        pairs.append({"prompt": p, "keras_hub": ours_text, "transformers": theirs_text, "same": ours_text == theirs_text})
    result["generation"] = {"prompts": len(pairs), "same": sum(p["same"] for p in pairs), "pairs": pairs}
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    ok = (result["logits"]["max_rel_error"] < 1e-4 and all(m["mismatched"] == 0 for m in mismatches.values())
          and result["generation"]["same"] == len(pairs))
    print(json.dumps({k: v for k, v in result.items() if k != "generation"} | {
        "generation_same": f"{result['generation']['same']}/{len(pairs)}"}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
