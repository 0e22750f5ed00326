"""One Keras bench setup in this process (`KERAS_BACKEND` picks JAX or TensorFlow).

    KERAS_BACKEND=jax python -m lora3.bench.setups.keras_worker '<json spec>'

Training setups time `model.train_on_batch` (compiled with `jit_compile=True`, AdamW, sparse
cross-entropy on logits, no metrics): what a user of `fit()` gets per step. The `rank-sweep`
setup times lora3 at several ranks (and target sets) in one process, round-robin; `round-robin`
times several of the training setups that way. The `inference` setup times the jitted forward
(`predict_on_batch`) of the base model, unmerged and merged adapters, round-robin, and
`generate()` tokens per second.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

import lora3
from lora3.run.backend import NEEDS_TENSORFLOW, leave_out_tensorflow
from lora3.run.cache import default_cache_dir
from lora3.run.remat import remat_blocks

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lora3.bench.setups.common import (  # noqa: E402
    ALL_SETUPS, CAUSAL_MODELS, FULL_LOGITS, MODELS, REMAT, TIMELINE, batch_arrays, causal_batch, current_rss_mb,
    is_causal, main, start_timed_phase, summarize_steps, time_steps,
)

SETUPS = ALL_SETUPS


def _keras():
    import keras

    return keras


def build_model(spec):
    keras = _keras()
    import keras_hub

    keras.utils.set_random_seed(spec["seed"])
    if is_causal(spec["model"]):
        return build_causal(spec)
    arch = MODELS[spec["model"]]
    backbone = keras_hub.models.T5Backbone(
        **arch,
        activation="gelu",
        use_gated_activation=True,
        tie_embedding_weights=False,
        dropout=spec.get("dropout", 0.0),
        dtype=spec.get("dtype", "float32"),
    )
    return keras_hub.models.T5Seq2SeqLM(backbone=backbone, preprocessor=None)


def build_causal(spec):
    """Gemma 3 as keras-hub's `Gemma3CausalLM` (no preprocessor): the real 270M from lora3's cached
    preset of the PyPI GGUF (converted once), or the random tiny stand-in."""
    import keras_hub

    m = CAUSAL_MODELS[spec["model"]]
    if m["gguf"]:
        from lora3.run import gemma3_gguf  # the app extra (sentencepiece): only for the real model

        preset = gemma3_gguf.ensure_preset(gemma3_gguf.packaged_gguf(), default_cache_dir())
        backbone = keras_hub.models.Gemma3Backbone.from_preset(str(preset), dtype=spec.get("dtype", "float32"))
    else:
        backbone = keras_hub.models.Gemma3Backbone(**m["arch"], dropout=spec.get("dropout", 0.0),
                                                   dtype=spec.get("dtype", "float32"))
    return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)


def train_batch(spec):
    """(x, y, sample_weight) of the setup's training step."""
    if is_causal(spec["model"]):
        return causal_batch(spec, full_logits=spec["setup"] in FULL_LOGITS)
    arrays = batch_arrays(spec, MODELS[spec["model"]]["vocabulary_size"])
    y = arrays.pop("labels")
    return arrays, y, None


def fit_model(spec, model):
    """The model `train_on_batch` runs: lora3's completion-loss view for a decoder-only model
    (what the app fits), the task model itself otherwise (and for `*-full_logits`)."""
    if is_causal(spec["model"]) and spec["setup"] not in FULL_LOGITS:
        from lora3.run.completion import CompletionLoss

        return CompletionLoss(model)
    return model


def ready_model(spec):
    """(model, adapted layers): the setup's model built, adapted or frozen (`prepare`), wrapped as
    the app fits it (`fit_model`) and compiled, not yet run."""
    model = build_model(spec)
    adapted = prepare(spec, model)
    model = fit_model(spec, model)
    compile_model(model, spec)
    return model, adapted


def _count(variables):
    seen, n = set(), 0
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            n += int(_prod(v.shape))
    return n


def _prod(shape):
    out = 1
    for d in shape:
        out *= int(d)
    return out


def enable_keras_lora(model, targets, rank, alpha):
    """Keras' own `enable_lora`, on the layers lora3 would wrap (its default names match nothing on T5)."""
    chosen = lora3.find_targets(model, targets)
    lora_vars = []
    for path, (layer, _role) in chosen.items():
        layer.enable_lora(rank, lora_alpha=alpha)
        lora_vars += [layer.lora_kernel_a, layer.lora_kernel_b]
    ids = {id(v) for v in lora_vars}
    for v in model.weights:
        v.trainable = id(v) in ids
    return len(chosen)


def prepare(spec, model):
    """Applies the setup's adapter / freezing; returns the number of adapted layers."""
    kind, targets = SETUPS[spec["setup"]]
    if kind == "full":
        return 0
    if kind == "forward":
        for v in model.weights:
            v.trainable = False
        return 0
    if kind == "floor":
        # Everything frozen but the first norm scale of each stack: the step runs the forward
        # and the whole input-gradient backward (down to both stacks' first layer) with no weight
        # gradient worth the name. Any LoRA step does at least this work.
        keep = [next(v for v in model.weights if v.path.startswith(prefix) and "layer_norm" in v.path)
                for prefix in ("transformer_encoder_layer_0/", "transformer_decoder_layer_0/")]
        for v in model.weights:
            v.trainable = any(v is k for k in keep)
        return 0
    if kind == "lora3":
        report = lora3.apply_lora(model, lora3.LoraConfig(rank=spec["rank"], alpha=spec["alpha"], targets=targets))
        if spec["setup"] in REMAT:  # as the app's trainer.remat=full, after the surgery
            if not remat_blocks(model):
                raise ValueError(f"setup {spec['setup']!r}: --model {spec['model']} has no transformer block to remat")
        return len(report.rows)
    if kind == "keras" and is_causal(spec["model"]):
        # Keras' own LoRA as keras-hub users call it: the backbone's default names (`query`, `value`
        # on Gemma: q and v only), alpha = rank (keras-hub passes none); everything else frozen.
        model.backbone.enable_lora(spec["rank"])
        return len(model.backbone._lora_enabled_layers)
    if kind == "keras":
        return enable_keras_lora(model, targets, spec["rank"], spec["alpha"])
    raise ValueError(f"setup {spec['setup']!r} is not a Keras setup")


def compile_model(model, spec):
    keras = _keras()
    if is_causal(spec["model"]):
        # As lora3.run.train.compile_model (no metrics: none of the setups computes any): the completion
        # loss, or keras-hub's full-logit cross-entropy averaged over the weighted (completion) tokens.
        from lora3.run.completion import CompletionLoss, completion_loss

        if isinstance(model, CompletionLoss):
            loss = completion_loss()
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")
        model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-4), loss=loss, jit_compile=True)
        return
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=None,
        sampler="greedy",
        jit_compile=True,
    )


def lower_train_step(model, x, y, sw=None):
    """The train step `train_on_batch` jits (JAX), lowered for this model's state and batch: for
    XLA's cost and memory analyses. The model must have run one step (the optimizer state exists)."""
    import jax

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    return jax.jit(model.train_step).lower(state, (x, y, sw))


def jax_step_flops(model, x, y, how="lowered", sw=None):
    """FLOPs of one train step (the function `train_on_batch` jits), from XLA's cost analysis
    of the lowered HLO, or of the compiled executable (`how="compiled"`: a second compile)."""
    lowered = lower_train_step(model, x, y, sw)
    cost = lowered.cost_analysis() if how == "lowered" else None
    if cost is None:  # the GPU backend gives no analysis of lowered HLO: compile it
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0)) or None


def count_step_flops(model, x, y, spec, sw=None):
    """{"flops_per_step": ...} on JAX unless `spec["flops"]` is "none"; cost analysis is best
    effort, so a failure is reported as {"flops_error": ...} instead of stopping the setup."""
    how = spec.get("flops", "lowered")
    if _keras().backend.backend() != "jax" or how == "none":
        return {}
    try:
        return {"flops_per_step": jax_step_flops(model, x, y, how, sw)}
    except Exception as exc:
        return {"flops_error": f"{type(exc).__name__}: {exc}"[:300]}


def run_train(spec):
    x, y, sw = train_batch(spec)
    t0 = time.perf_counter()
    model, adapted = ready_model(spec)
    build_s = time.perf_counter() - t0
    rss_after_build = current_rss_mb()  # imports + model: what every setup pays before training

    def step():
        model.train_on_batch(x, y, sample_weight=sw)

    flops = {}

    def count_flops():  # untimed: before this worker's turn to time its steps
        flops.update(count_step_flops(model, x, y, spec, sw))

    first, times = time_steps(step, spec["warmup"], spec["steps"], before_timing=count_flops)
    out = summarize_steps(spec, first, times)
    opt_vars = list(model.optimizer.variables)
    out.update(
        build_s=build_s,
        rss_after_build_mb=rss_after_build,
        adapted_layers=adapted,
        trainable_params=_count(model.trainable_weights),
        total_params=_count(model.weights),
        optimizer_variables=len(opt_vars),
        optimizer_bytes=int(sum(_prod(v.shape) * np.dtype(v.dtype).itemsize for v in opt_vars)),
        flops_per_step=None,
    )
    out.update(flops)
    return out


def run_inference(spec):
    """Forward latency and generate() tokens/s: base, unmerged and merged adapters, round-robin."""
    keras = _keras()
    arrays = batch_arrays(spec, MODELS[spec["model"]]["vocabulary_size"])
    arrays.pop("labels")
    x = arrays
    variants = {}
    base = build_model(spec)
    compile_model(base, spec)
    variants["base"] = base
    for targets in spec.get("inference_targets", ["qv", "all_linear"]):
        for merged in (False, True):
            m = build_model(spec)
            lora3.apply_lora(m, lora3.LoraConfig(rank=spec["rank"], alpha=spec["alpha"], targets=targets))
            r = np.random.default_rng(spec["seed"] + 2)  # same adapter values in both copies
            for w in lora3.lora_layers(m):
                w.lora_B.assign(r.normal(0, 0.02, w.lora_B.shape).astype("float32"))
            if merged:
                for w in lora3.lora_layers(m):
                    w.merge()
            compile_model(m, spec)
            variants[f"{targets}-{'merged' if merged else 'unmerged'}"] = m

    outputs, compile_s = {}, {}
    for name, m in variants.items():  # first call compiles
        t0 = time.perf_counter()
        outputs[name] = np.asarray(m.predict_on_batch(x))
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in variants}
    for _ in range(spec["inference_rounds"]):
        for name, m in variants.items():
            t0 = time.perf_counter()
            np.asarray(m.predict_on_batch(x))
            times[name].append(time.perf_counter() - t0)
    records = []
    for name in variants:
        med = statistics.median(times[name])
        rec = {
            "variant": name,
            "median_forward_s": med,
            "forward_times_s": times[name],
            "forward_compile_s": max(compile_s[name] - med, 0.0),
        }
        if name.endswith("-merged"):
            twin = name.replace("-merged", "-unmerged")
            rec["max_abs_diff_vs_unmerged"] = float(np.max(np.abs(outputs[name] - outputs[twin])))
        records.append(rec)

    # generate(): greedy, no stop token, fills the decoder length after one start token.
    gen_names = [n for n in spec.get("generate_variants", []) if n in variants]
    if gen_names and spec.get("generate_rounds", 0) > 0:
        b, d = spec["batch"], spec["dec_len"]
        gx = {
            "encoder_token_ids": x["encoder_token_ids"],
            "encoder_padding_mask": x["encoder_padding_mask"],
            "decoder_token_ids": np.zeros((b, d), "int32"),
            "decoder_padding_mask": np.concatenate([np.ones((b, 1), "int32"), np.zeros((b, d - 1), "int32")], 1),
        }
        new_tokens = b * (d - 1)
        gtimes, gfirst = {n: [] for n in gen_names}, {}
        for n in gen_names:
            t0 = time.perf_counter()
            variants[n].generate(gx, stop_token_ids=None)
            gfirst[n] = time.perf_counter() - t0
        for _ in range(spec["generate_rounds"]):
            for n in gen_names:
                t0 = time.perf_counter()
                variants[n].generate(gx, stop_token_ids=None)
                gtimes[n].append(time.perf_counter() - t0)
        for rec in records:
            n = rec["variant"]
            if n in gtimes:
                med = statistics.median(gtimes[n])
                rec.update(generate_median_s=med, generate_tokens_per_s=new_tokens / med,
                           generate_compile_s=max(gfirst[n] - med, 0.0), generate_new_tokens=new_tokens)
    return {"inference": records, "backend_name": keras.backend.backend()}


def run_round_robin(spec):
    """Several training setups in this process, timed side by side: `spec["points"]` lists
    (setup, rank) pairs. Every model is built, compiled, warmed up and its FLOPs counted, then the
    timed steps go round-robin (one step per model per round, alternate rounds reversed), so the
    ratios between them carry no process-to-process variation. The rank sweep is one of these."""
    points = [tuple(p) for p in spec["points"]]
    models, compile_s, flops, batches = {}, {}, {}, {}
    for setup, rank in points:
        s = dict(spec, setup=setup, rank=rank)
        x, y, sw = batches[setup, rank] = train_batch(s)
        model, _ = ready_model(s)
        t0 = time.perf_counter()
        model.train_on_batch(x, y, sample_weight=sw)
        compile_s[setup, rank] = time.perf_counter() - t0
        for _ in range(max(spec["warmup"] - 1, 0)):
            model.train_on_batch(x, y, sample_weight=sw)
        models[setup, rank] = model
    for key, model in models.items():  # untimed, before the gate
        x, y, sw = batches[key]
        flops[key] = count_step_flops(model, x, y, spec, sw)
    start_timed_phase()
    times = {key: [] for key in models}
    for i in range(spec["steps"]):
        for key in (points if i % 2 == 0 else points[::-1]):
            x, y, sw = batches[key]
            t0 = time.perf_counter()
            models[key].train_on_batch(x, y, sample_weight=sw)
            times[key].append(time.perf_counter() - t0)
    TIMELINE["timed_end_unix"] = time.time()
    out = []
    for (setup, rank), model in models.items():
        med = statistics.median(times[setup, rank])
        out.append({"setup": setup, "rank": rank, "median_step_s": med, "step_times_s": times[setup, rank],
                    "compile_s": max(compile_s[setup, rank] - med, 0.0),
                    "flops_per_step": flops[setup, rank].get("flops_per_step"),
                    "trainable_params": _count(model.trainable_weights)})
    return {"points": out}


def run(spec):
    if is_causal(spec["model"]) and "gemma3" not in NEEDS_TENSORFLOW:
        # As the app's Gemma 3 job (lora3.run.backend.start): TensorFlow left out unless it is the backend.
        leave_out_tensorflow(os.environ.get("KERAS_BACKEND", "jax"))
    if spec["setup"] == "inference":
        return run_inference(spec)
    if spec["setup"] in ("rank-sweep", "round-robin"):
        return run_round_robin(spec)
    return run_train(spec)


if __name__ == "__main__":
    main(run)
