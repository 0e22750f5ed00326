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
    for _ in range(max(warmup - 1, 0)):
        step()
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
    tokens = spec["batch"] * (spec["enc_len"] + spec["dec_len"])
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
