"""trainer.remat=blocks against no remat, side by side in one process (JAX): XLA's temporary memory of
the compiled training step (activations and other buffers, from `compiled.memory_analysis()`), and the
median step time, alternating the two steps.

    python experiments/benchmarks/remat_memory.py --model t5_base --out experiments/benchmarks/remat_t5_base.json
    LORA3_CACHE=/tmp/l3cache python experiments/benchmarks/remat_memory.py --model gemma3_270m --out ...

t5_base: FLAN-T5-base's architecture (random init), the tutorial recipe's batch 16 x (128 + 128), LoRA
all_linear r=8, loss over the untied head. gemma3_270m: the real Gemma 3 270M, the Gemma 3 study's batch
(8 x (1 + 56 + 36)), LoRA all_linear r=8, lora3's completion loss. gemma3_270m_arch: its architecture
with random weights (the GPU machine, where the GGUF cannot travel).
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np  # noqa: E402

from lora3.bench.setups.common import CAUSAL_MODELS  # noqa: E402  (no keras import)


def build(model):
    import keras
    import keras_hub

    import lora3

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if model == "t5_base":
        backbone = keras_hub.models.T5Backbone(vocabulary_size=32128, num_layers=12, num_heads=12, hidden_dim=768,
                                               intermediate_dim=2048, key_value_dim=64, activation="gelu",
                                               use_gated_activation=True, tie_embedding_weights=False)
        x = {"encoder_token_ids": rng.integers(3, 32128, (16, 128)).astype("int32"),
             "encoder_padding_mask": np.ones((16, 128), "int32"),
             "decoder_token_ids": rng.integers(3, 32128, (16, 128)).astype("int32"),
             "decoder_padding_mask": np.ones((16, 128), "int32")}
        y = rng.integers(3, 32128, (16, 128)).astype("int32")

        def loss_fn(_model, x, y):
            out = backbone(x, training=True)["decoder_sequence_output"]
            z = backbone.token_embedding(out, reverse=True)
            return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True))

        target = backbone
    else:
        from lora3.run import gemma3_gguf, models
        from lora3.run.completion import CompletionLoss

        if model == "gemma3_270m":
            where = gemma3_gguf.ensure_preset(gemma3_gguf.packaged_gguf(), os.environ.get("LORA3_CACHE"))
            lm = models.build({"name": "gemma3_270m", "family": "gemma3", "preset": str(where)}, [], seed=0).model
        else:  # the same architecture, random weights (where the GGUF cannot be had: the GPU machine)
            lm = keras_hub.models.Gemma3CausalLM(
                backbone=keras_hub.models.Gemma3Backbone(**CAUSAL_MODELS["gemma3_270m_arch"]["arch"]),
                preprocessor=None)
        backbone = lm.backbone
        n, length, k = 8, 93, 36
        positions = np.tile(np.arange(56, 56 + k), (n, 1)).astype("int32")
        x = {"token_ids": rng.integers(3, 262144, (n, length)).astype("int32"),
             "padding_mask": np.ones((n, length), "int32"), "loss_positions": positions,
             "loss_labels": rng.integers(3, 262144, (n, k)).astype("int32")}
        y = None
        view = CompletionLoss(lm)

        def loss_fn(_model, x, y):
            return keras.ops.mean(view(x, training=True)[..., 0])

        target = backbone
    lora3.apply_lora(target, lora3.LoraConfig(rank=8, alpha=16, targets="all_linear"))
    return backbone, loss_fn, x, y


def compiled_step(backbone, loss_fn, x, y):
    import jax
    import keras

    trainable = backbone.trainable_variables
    frozen = backbone.non_trainable_variables

    def loss(tv, fv, x, y):
        mapping = list(zip(trainable, tv)) + list(zip(frozen, fv))
        with keras.StatelessScope(state_mapping=mapping):
            return loss_fn(backbone, x, y)

    step = jax.jit(jax.value_and_grad(loss))
    args = ([v.value for v in trainable], [v.value for v in frozen], x, y)
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return compiled, args, compile_s, {"temp_bytes": int(mem.temp_size_in_bytes),
                                       "argument_bytes": int(mem.argument_size_in_bytes),
                                       "output_bytes": int(mem.output_size_in_bytes)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["t5_base", "gemma3_270m", "gemma3_270m_arch"], default="t5_base")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=["none", "blocks"], default=None,
                   help="one mode alone in this process, to read its peak RSS (ru_maxrss)")
    a = p.parse_args(argv)
    import jax

    from lora3.run import remat

    runs = {}
    for mode in ((a.only,) if a.only else ("none", "blocks")):
        backbone, loss_fn, x, y = build(a.model)
        if mode == "blocks":
            remat.remat_blocks(backbone)
        compiled, args, compile_s, mem = compiled_step(backbone, loss_fn, x, y)
        runs[mode] = {"compiled": compiled, "args": args, "compile_s": compile_s, **mem, "times": []}
    losses = {}
    for i in range(a.steps + 1):  # alternate: the first round is warm-up, not timed
        for mode in [m for m in (("none", "blocks") if i % 2 == 0 else ("blocks", "none")) if m in runs]:
            r = runs[mode]
            t0 = time.perf_counter()
            value, grads = r["compiled"](*r["args"])
            jax.block_until_ready(grads)
            if i:
                r["times"].append(time.perf_counter() - t0)
            losses[mode] = float(value)
    result = {"model": a.model, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "backend": "jax", "cpu_count": os.cpu_count(), "loss": losses, "modes": {}}
    for mode, r in runs.items():
        result["modes"][mode] = {k: r[k] for k in ("compile_s", "temp_bytes", "argument_bytes", "output_bytes")}
        result["modes"][mode]["step_s_median"] = statistics.median(r["times"])
        result["modes"][mode]["step_s"] = r["times"]
    import resource

    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if len(runs) == 2:
        n, b = result["modes"]["none"], result["modes"]["blocks"]
        result["ratios"] = {"temp_memory_blocks_over_none": b["temp_bytes"] / n["temp_bytes"],
                            "step_time_blocks_over_none": b["step_s_median"] / n["step_s_median"]}
    print(json.dumps({k: v for k, v in result.items()}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
