"""One PyTorch + PEFT bench setup in this process (the optional extra: torch, transformers, peft).

    python -m lora3.bench.setups.peft_worker '<json spec>'

The model is Hugging Face's `T5ForConditionalGeneration` at the same size as the Keras
setups (gated-GELU, untied head: transformers 5.x ties `lm_head` to `shared` even with
`tie_word_embeddings=False`, so it is untied by hand), random init, dropout as the spec says.
One step = forward, sparse cross-entropy on the logits, backward, AdamW (lr 1e-4), zero_grad.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX512")  # MKL runs at half speed here without it

from lora3.bench.setups.common import (  # noqa: E402
    MODELS, SETUPS, batch_arrays, current_rss_mb, main, summarize_steps, time_steps,
)

# HF T5 module names per lora3 target group (PEFT's "all-linear" would also leave lm_head out).
PEFT_TARGETS = {"qv": ["q", "v"], "all_linear": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]}


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


def run(spec):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    kind, targets = SETUPS[spec["setup"]]
    if kind != "peft":
        raise ValueError(f"setup {spec['setup']!r} is not a PEFT setup")
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
