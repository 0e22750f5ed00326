"""One PyTorch + PEFT bench setup in this process (the optional extra: torch, transformers, peft).

    python -m lora3.bench.setups.peft_worker '<json spec>'

The model is Hugging Face's `T5ForConditionalGeneration` at the same size as the Keras
setups (gated-GELU, untied head: transformers 5.x ties `lm_head` to `shared` even with
`tie_word_embeddings=False`, so it is untied by hand), random init, dropout as the spec says.
One step = forward, sparse cross-entropy on the logits, backward, AdamW (lr 1e-4), zero_grad.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX512")  # MKL runs at half speed here without it

from lora3.bench.setups.common import (  # noqa: E402
    ALL_SETUPS, CAUSAL_MODELS, MODELS, batch_arrays, causal_batch, current_rss_mb, is_causal, main,
    summarize_steps, time_steps,
)

SETUPS = ALL_SETUPS

# HF T5 module names per lora3 target group (PEFT's "all-linear" would also leave lm_head out).
PEFT_TARGETS = {"qv": ["q", "v"], "all_linear": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]}
# Hugging Face Gemma 3: every linear layer of the blocks.
GEMMA_PEFT_TARGETS = {"qv": ["q_proj", "v_proj"],
                      "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def build_model(spec):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(spec["seed"])
    a = MODELS[spec["model"]]
    config = T5Config(
        vocab_size=a["vocabulary_size"],
        d_model=a["hidden_dim"],
        d_ff=a["intermediate_dim"],
        d_kv=a["key_value_dim"],
        num_layers=a["num_layers"],
        num_decoder_layers=a["num_layers"],
        num_heads=a["num_heads"],
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=spec.get("dropout", 0.0),
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    if model.lm_head.weight is model.shared.weight:
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    return model


def build_causal(spec):
    """Hugging Face's `Gemma3ForCausalLM` in float32: the real 270M from `spec["hf_dir"]` (the same
    weights as the keras-hub preset), or the tiny stand-in's architecture at random init."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(spec["seed"])
    m = CAUSAL_MODELS[spec["model"]]
    if m["gguf"]:
        return AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    a = m["arch"]
    config = Gemma3TextConfig(
        vocab_size=a["vocabulary_size"], hidden_size=a["hidden_dim"], intermediate_size=a["intermediate_dim"],
        num_hidden_layers=a["num_layers"], num_attention_heads=a["num_query_heads"],
        num_key_value_heads=a["num_key_value_heads"], head_dim=a["head_dim"], query_pre_attn_scalar=a["head_dim"],
        sliding_window=a["sliding_window_size"], tie_word_embeddings=True, attention_dropout=spec.get("dropout", 0.0),
        bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return Gemma3ForCausalLM(config)


def run_causal(spec, targets):
    """PEFT on HF's Gemma 3: one step = forward with `labels` (HF computes every position's logits
    and its own shifted cross-entropy, -100 outside the completion), backward, AdamW, zero_grad."""
    import peft
    import torch

    x, y, w = causal_batch(spec, full_logits=True)
    ids = torch.from_numpy(x["token_ids"]).long()
    mask = torch.from_numpy(x["padding_mask"]).long()
    # HF shifts the labels itself: the label of input position i + 1 is predicted at position i.
    hf_labels = torch.full(ids.shape, -100, dtype=torch.long)
    hf_labels[:, 1:] = torch.from_numpy(np.where(w > 0, y, -100)[:, :-1]).long()
    model = build_causal(spec)
    total = sum(p.numel() for p in model.parameters())
    config = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                             target_modules=GEMMA_PEFT_TARGETS[targets], task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def loss_fn():
        return model(input_ids=ids, attention_mask=mask, labels=hf_labels).loss

    return _time_peft(spec, model, params, opt, loss_fn, total, peft, torch)


def run(spec):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    kind, targets = SETUPS[spec["setup"]]
    if kind != "peft":
        raise ValueError(f"setup {spec['setup']!r} is not a PEFT setup")
    if is_causal(spec["model"]):
        return run_causal(spec, targets)
    import peft

    arrays = batch_arrays(spec, MODELS[spec["model"]]["vocabulary_size"])
    t = {k: torch.from_numpy(v).long() for k, v in arrays.items()}
    model = build_model(spec)
    total = sum(p.numel() for p in model.parameters())
    config = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                             target_modules=PEFT_TARGETS[targets])
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = MODELS[spec["model"]]["vocabulary_size"]

    def loss_fn():
        logits = model(
            input_ids=t["encoder_token_ids"],
            attention_mask=t["encoder_padding_mask"],
            decoder_input_ids=t["decoder_token_ids"],
            decoder_attention_mask=t["decoder_padding_mask"],
        ).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), t["labels"].reshape(-1))

    return _time_peft(spec, model, params, opt, loss_fn, total, peft, torch)


def _time_peft(spec, model, params, opt, loss_fn, total, peft, torch):
    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    flops = {}

    def count_flops():  # untimed: before this worker's turn to time its steps
        if spec.get("flops", "lowered") != "none":
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                loss = loss_fn()
                loss.backward()
            opt.zero_grad(set_to_none=True)
            flops["flops_per_step"] = float(counter.get_total_flops())

    rss_after_build = current_rss_mb()
    first, times = time_steps(step, spec["warmup"], spec["steps"], before_timing=count_flops)
    out = summarize_steps(spec, first, times)
    out["rss_after_build_mb"] = rss_after_build
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    out.update(
        adapted_layers=sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)),
        trainable_params=sum(p.numel() for p in params),
        total_params=total + sum(p.numel() for p in params),
        optimizer_variables=len(state),
        optimizer_bytes=int(sum(v.numel() * v.element_size() for v in state)),
        flops_per_step=None,
        torch_threads=torch.get_num_threads(),
    )
    out.update(flops)
    return out


if __name__ == "__main__":
    main(run)
