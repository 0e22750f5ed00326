"""Where a compiled JAX train step spends its time, op by op (FLAN-T5-small bench batch), from a
profiler trace: XLA:CPU records one event per executed op with `--xla_cpu_enable_xprof_traceme`.

    KERAS_BACKEND=jax python experiments/benchmarks/step_profile.py lora3-all_linear [frozen-floor ...]

For each bench setup: three steps traced (after three untraced), then the top ops by time per step,
grouped by op kind and output shape, with the layer they belong to from the op metadata. Durations
are summed per event (profiling adds a few microseconds to each), so read them as shares, not as a
step time. This is how the slow rank-contracting dots were found (`lora3/layers/low_rank.py`).
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import jax  # noqa: E402

from lora3.bench.setups import keras_worker as kw  # noqa: E402

STEPS = 3


def instructions(hlo_text):
    """name -> (output shape, first operands' shapes, op_name metadata) of each HLO instruction."""
    shapes, rows = {}, {}
    for line in hlo_text.split("\n"):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\w+)\(([^)]*)\)", line)
        if not m:
            continue
        shapes[m.group(1)] = m.group(2)
        op = re.search(r'op_name="([^"]*)"', line)
        rows[m.group(1)] = (m.group(2), m.group(4), op.group(1) if op else "")
    return {n: (out, tuple(shapes.get(o.strip().lstrip("%"), "?") for o in args.split(",")[:2]), op)
            for n, (out, args, op) in rows.items()}


for setup in sys.argv[1:] or ["frozen-floor", "lora3-all_linear"]:
    spec = dict(model="small", batch=8, enc_len=64, dec_len=32, seed=0, rank=8, alpha=16.0, setup=setup)
    x, y, _ = kw.train_batch(spec)
    model, _ = kw.ready_model(spec)
    for _ in range(3):
        model.train_on_batch(x, y)
    info = instructions(kw.lower_train_step(model, x, y).compile().as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(STEPS):
                model.train_on_batch(x, y)
        trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in info:
            out, operands, op = info[e["name"]]
            layer = re.sub(r"transformer_(en|de)coder_layer_\d+", "L", op.replace("jit(train_step)/", ""))
            key = (re.sub(r"[.]\d+$", "", e["name"]), out, operands, layer[-70:])
            total[key] += e["dur"] / STEPS
            count[key] += 1 / STEPS
    print(f"== {setup}: {sum(total.values()) / 1000:.1f} ms of op events per step")
    for key, us in total.most_common(25):
        kind, out, operands, layer = key
        print(f"  {us / 1000:7.2f} ms  x{count[key]:4.0f}  {kind:18s} {out:18s} <- {' '.join(operands):34s} {layer}")
