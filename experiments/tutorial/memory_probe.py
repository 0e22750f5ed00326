#!/usr/bin/env python
"""Memory of the tutorial recipe's training step, measured (no download needed).

FLAN-T5-base architecture (random init: memory does not depend on the weights' values), LoRA r=4 on
all_linear (216 Dense layers), batch 16 x (128 encoder + 128 decoder) tokens, float32, Adam, T5's
dropout 0.1 on (training=True), masked sparse cross-entropy from logits: the step `experiment=tutorial` runs.

    python experiments/tutorial/memory_probe.py               # compile only: XLA's buffer assignment
    python experiments/tutorial/memory_probe.py --run 3       # also run 3 steps; on a GPU: peak_bytes_in_use
    python experiments/tutorial/memory_probe.py --full        # baseline: full fine-tuning (no LoRA)

JAX only (it reads `compiled.memory_analysis()` and the device's `memory_stats()`). Prints one JSON line.
"""

import argparse
import json
import os
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # so device stats show what the step uses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--src-len", type=int, default=128)
    ap.add_argument("--tgt-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--targets", default="all_linear")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--run", type=int, default=0, help="also run this many steps (timed)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    import jax
    import keras
    import keras_hub
    import numpy as np

    import lora3
    from lora3.param_table import build_backbone

    t0 = time.perf_counter()
    keras.utils.set_random_seed(0)
    model = keras_hub.models.T5Seq2SeqLM(backbone=build_backbone("flan_base_multi"), preprocessor=None)
    if args.full:
        lora_params = 0
    else:
        report = lora3.apply_lora(model, lora3.LoraConfig(rank=args.rank, alpha=args.rank, targets=args.targets))
        lora_params = report.lora_params
    optimizer = keras.optimizers.Adam(learning_rate=3e-5)
    optimizer.build(model.trainable_variables)
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    B, S, T = args.batch, args.src_len, args.tgt_len
    x = {
        "encoder_token_ids": rng.integers(3, 32128, (B, S)).astype("int32"),
        "encoder_padding_mask": np.ones((B, S), "int32"),
        "decoder_token_ids": rng.integers(3, 32128, (B, T)).astype("int32"),
        "decoder_padding_mask": np.ones((B, T), "int32"),
    }
    y = rng.integers(3, 32128, (B, T)).astype("int32")
    sw = np.ones((B, T), "float32")

    def loss_fn(tv, ntv, x, y, sw):
        logits, ntv = model.stateless_call(tv, ntv, x, training=True)
        ce = keras.ops.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return keras.ops.sum(ce * sw) / keras.ops.sum(sw), ntv

    def step(tv, ntv, ov, x, y, sw):
        (loss, ntv), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv, ntv, x, y, sw)
        tv, ov = optimizer.stateless_apply(ov, grads, tv)
        return loss, tv, ntv, ov

    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]
    ov = [v.value for v in optimizer.variables]
    nbytes = lambda vs: int(sum(v.size * v.dtype.itemsize for v in vs))  # noqa: E731
    t1 = time.perf_counter()
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    compiled = jitted.lower(tv, ntv, ov, x, y, sw).compile()
    compile_s = time.perf_counter() - t1
    ma = compiled.memory_analysis()
    res = {
        "device": str(jax.devices()[0]), "platform": jax.devices()[0].platform,
        "batch": B, "src_len": S, "tgt_len": T, "mode": "full" if args.full else f"lora r={args.rank} {args.targets}",
        "params_total": int(model.count_params()), "lora_params": int(lora_params),
        "trainable_bytes": nbytes(tv), "frozen_bytes": nbytes(ntv), "optimizer_bytes": nbytes(ov),
        "build_s": round(build_s, 1), "compile_s": round(compile_s, 1),
    }
    if ma is not None:
        res.update({
            "xla_argument_bytes": int(ma.argument_size_in_bytes), "xla_output_bytes": int(ma.output_size_in_bytes),
            "xla_alias_bytes": int(ma.alias_size_in_bytes), "xla_temp_bytes": int(ma.temp_size_in_bytes),
        })
        # live at the step's peak (upper bound): inputs + outputs not aliased to them + temporaries
        res["xla_peak_bytes_bound"] = (res["xla_argument_bytes"] + res["xla_output_bytes"]
                                       - res["xla_alias_bytes"] + res["xla_temp_bytes"])
    if args.run:
        times = []
        for _ in range(args.run):
            t = time.perf_counter()
            loss, tv, ntv, ov = compiled(tv, ntv, ov, x, y, sw)
            float(loss)
            times.append(time.perf_counter() - t)
        res["step_s"] = [round(t, 4) for t in times]
        res["loss"] = float(loss)
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            res["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    print(json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
