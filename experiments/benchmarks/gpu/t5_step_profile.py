"""FLAN-T5-base training steps on one GPU, variants side by side in one process, with a kernel profile.

    KERAS_BACKEND=jax python experiments/benchmarks/gpu/t5_step_profile.py --out t5_profile.json

Each variant is the bench's setup (`lora3.bench.setups.keras_worker.ready_model`: same model, batch,
loss, optimizer, `train_on_batch`) plus at most these changes, so that one run says where the time goes:
- `fused`: `lora3.fuse_attention` (the attention as one `keras.ops.dot_product_attention`: cuDNN flash
  attention on an NVIDIA GPU);
- `frozen_bias`: full fine-tuning with T5's two relative-position-bias tables (32 x 12 each) frozen;
- `dots`: the rank-contracting LoRA products as plain matmuls (`lora3.layers.low_rank.UNROLL_MAX_RANK = 0`).
Variants named in `--trace` also get a `jax.profiler` trace of two steps, summed by kernel and by kind
(GEMM, attention, scatter, other fusions, copies) and against the step's wall time. Model FLOPs are
counted by hand from the architecture (matmuls only): training = 3x forward, LoRA = 2x forward (no
weight gradient for frozen kernels; the rank-8 terms add < 0.1%). The result file is rewritten
after every variant, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import glob
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")

import lora3  # noqa: E402
import lora3.layers.low_rank as low_rank  # noqa: E402
from lora3.bench.setups import keras_worker  # noqa: E402
from lora3.bench.setups.common import MODELS  # noqa: E402

SETUP = {"forward": "forward-only", "qv": "lora3-qv", "all_linear": "lora3-all_linear", "full": "full"}
CHANGES = ("fused", "frozen_bias", "dots")


def model_tflop(model, batch, enc, dec):
    """Forward-pass TFLOP of one batch, matmuls only: projections, attention (scores and weighted
    sum), gated FFN, untied LM head. FLAN-T5-base at 32 x (512 + 512): 8.23."""
    a = MODELS[model]
    d, f, v, n = a["hidden_dim"], a["intermediate_dim"], a["vocabulary_size"], a["num_layers"]
    inner = a["num_heads"] * a["key_value_dim"]
    te, td = batch * enc, batch * dec  # tokens
    enc_macs = te * (4 * d * inner + 3 * d * f) + 2 * batch * enc * enc * inner
    dec_macs = (td * (6 * d * inner + 3 * d * f) + te * 2 * d * inner  # self q,k,v,o; cross q,o; cross k,v
                + 2 * batch * dec * dec * inner + 2 * batch * dec * enc * inner)
    head_macs = td * d * v
    return 2 * (n * (enc_macs + dec_macs) + head_macs) / 1e12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--enc-len", type=int, default=512)
    p.add_argument("--dec-len", type=int, default=512)
    p.add_argument("--dtype", default="mixed_bfloat16")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--variants", default="qv,all_linear,forward,full,full+frozen_bias,qv+fused,"
                   "all_linear+fused,forward+fused,all_linear+fused+dots,full+fused")
    p.add_argument("--trace", default="qv,full,qv+fused", help="variants to profile (comma-separated)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--steps-full", type=int, default=3, help="timed steps of the (slow) full setups")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense peak, for MFU")
    p.add_argument("--save-traces", default=None, help="folder to copy each trace file to (trace_<variant>.json.gz)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def _kind(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("fmha", "flash", "cudnn", "attn", "sdpa")):
        return "attention (cuDNN)"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "cublas", "matmul", "dot", "wgmma", "sm90")):
        return "gemm"
    if "scatter" in n:
        return "scatter"
    if any(k in n for k in ("memcpy", "memset", "copy")):
        return "copy"
    if "reduce" in n or "reduction" in n:
        return "reduction fusion"
    return "other"


def summarize_trace(logdir, steps, top=25):
    """Device time per step (seconds) from the trace: by kernel and by kind on the GPU's streams, by
    HLO op on the profiler's "XLA Ops" line, the "XLA Modules" line (whole steps)."""
    files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True) or \
        glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return {"error": f"no trace file under {logdir}"}
    with gzip.open(files[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[e["pid"], e.get("tid")] = e.get("args", {}).get("name", "")
    device = {pid for pid, n in procs.items() if "gpu" in n.lower() or "device" in n.lower()}
    lines = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device:
            lines[threads.get((e["pid"], e.get("tid")), "?")] += float(e.get("dur", 0.0)) / 1e6 / steps
    streams = {t for t in lines if "stream" in t.lower()} or set(lines)
    by_name, by_kind, by_op, modules = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device:
            continue
        line = threads.get((e["pid"], e.get("tid")), "?")
        dur, name = float(e.get("dur", 0.0)) / 1e6 / steps, e.get("name", "?")
        if line in streams:
            by_name[name[:150]] += dur
            by_kind[_kind(name)] += dur
        elif "xla ops" in line.lower():
            by_op[name[:150]] += dur
        elif "module" in line.lower():
            modules[name[:150]] += dur
    top_of = lambda d, n=top: dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])  # noqa: E731
    return {"device_s_per_step": sum(by_kind.values()), "trace_file": os.path.basename(files[0]),
            "processes": sorted(set(procs.values())), "device_lines_s": top_of(lines, 40),
            "by_kind_s": top_of(by_kind), "top_kernels_s": top_of(by_name), "top_hlo_ops_s": top_of(by_op),
            "modules_s": top_of(modules, 10)}


def run_variant(name, a):
    base, *changes = name.split("+")
    unknown = [c for c in changes if c not in CHANGES]
    if base not in SETUP or unknown:
        raise ValueError(f"variant {name!r}: base one of {sorted(SETUP)}, changes from {CHANGES}")
    spec = dict(model=a.model, setup=SETUP[base], rank=a.rank, alpha=2 * a.rank, seed=0, dtype=a.dtype,
                batch=a.batch, enc_len=a.enc_len, dec_len=a.dec_len, dropout=0.0)
    x, y, sw = keras_worker.train_batch(spec)
    t0 = time.perf_counter()
    model = keras_worker.build_model(spec)
    keras_worker.prepare(spec, model)
    out = {"variant": name}
    if "frozen_bias" in changes:
        # keras-hub names each stack's (buckets, heads) table `<...>self_attention/embeddings`
        frozen = [v for v in model.weights if "self_attention" in v.path and v.path.endswith("embeddings")]
        for v in frozen:
            v.trainable = False
        out["frozen"] = [v.path for v in frozen]
    if "fused" in changes:
        out["fused_layers"] = len(lora3.fuse_attention(model))
    keras_worker.compile_model(model, spec)
    build_s = time.perf_counter() - t0
    saved = low_rank.UNROLL_MAX_RANK
    if "dots" in changes:
        low_rank.UNROLL_MAX_RANK = 0
    try:
        t0 = time.perf_counter()
        loss0 = float(np.ravel(model.train_on_batch(x, y, sample_weight=sw))[0])
        first = time.perf_counter() - t0
    finally:
        low_rank.UNROLL_MAX_RANK = saved  # the step is traced: the setting is baked in
    for _ in range(max(a.warmup - 1, 0)):
        model.train_on_batch(x, y, sample_weight=sw)
    times = []
    for _ in range(a.steps_full if base == "full" else a.steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y, sample_weight=sw)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    fwd = model_tflop(a.model, a.batch, a.enc_len, a.dec_len)
    tflop = fwd * {"forward": 1, "full": 3}.get(base, 2)
    out.update(build_s=build_s, compile_s=max(first - med, 0.0), first_loss=loss0, median_step_s=med,
               step_times_s=times, model_tflop_per_step=tflop, achieved_tflop_per_s=tflop / med,
               mfu=tflop / med / a.peak_tflops,
               trainable_params=keras_worker._count(model.trainable_weights))
    if name in a.trace.split(","):
        import jax

        logdir = tempfile.mkdtemp(prefix="trace-")
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # device and XLA lines only: a small file
        with jax.profiler.trace(logdir, profiler_options=options):
            t0 = time.perf_counter()
            for _ in range(2):
                model.train_on_batch(x, y, sample_weight=sw)
            wall = (time.perf_counter() - t0) / 2
        out["profile"] = summarize_trace(logdir, 2)
        if a.save_traces:
            for f in glob.glob(os.path.join(logdir, "**", "*.json.gz"), recursive=True)[:1]:
                if os.path.getsize(f) < 15 * 2**20:  # what the device machine sends back
                    shutil.copy(f, os.path.join(a.save_traces, f"trace_{name.replace('+', '_')}.json.gz"))
        out["profile"]["wall_s_per_step_traced"] = wall
    del model
    gc.collect()
    return out


def main(argv=None):
    a = parse_args(argv)
    import jax
    import keras

    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "keras": keras.__version__,
              "model": a.model, "batch": a.batch, "enc_len": a.enc_len, "dec_len": a.dec_len, "dtype": a.dtype,
              "rank": a.rank, "peak_tflops": a.peak_tflops,
              "forward_tflop": model_tflop(a.model, a.batch, a.enc_len, a.dec_len), "variants": [], "errors": {}}
    for name in a.variants.split(","):
        t0 = time.perf_counter()
        try:
            rec = run_variant(name, a)
            rec["variant_wall_s"] = time.perf_counter() - t0
            result["variants"].append(rec)
            print(f"{name:28s} {rec['median_step_s'] * 1e3:9.1f} ms/step  MFU {rec['mfu']:6.1%}  "
                  f"compile {rec['compile_s']:5.1f} s", flush=True)
        except Exception as exc:  # one variant failing (e.g. cuDNN refusing a shape) keeps the rest
            result["errors"][name] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{name:28s} FAILED {result['errors'][name][:300]}", flush=True)
            gc.collect()
        by = {r["variant"]: r for r in result["variants"]}
        if "forward" in by:
            for r in result["variants"]:
                r["x_forward"] = r["median_step_s"] / by["forward"]["median_step_s"]
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
