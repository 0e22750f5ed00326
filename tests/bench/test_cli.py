"""`python -m lora3.bench` at a tiny size: it runs, exits 0 and writes bench.json with the issue's fields.

No timing assertions here: performance lives in the benchmark (experiments/benchmarks/).
The bench starts its own worker process per setup and backend, so one invocation (in the JAX pass
of the suite) covers JAX and TensorFlow; the PEFT setup runs when torch, transformers and peft are
installed and is reported as skipped otherwise.
"""

import importlib.util
import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BACKEND = "jax"  # rank sweep and inference run on this one; training setups on both
BACKENDS = ("jax", "tensorflow")
pytestmark = pytest.mark.one_backend  # the bench picks each worker's backend itself

HAVE_PEFT = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))

RECORD_FIELDS = {
    "name", "backend", "median_step_s", "tokens_per_s", "peak_rss_mb", "trainable_params", "total_params",
    "ratio_to_full", "x_forward_only", "flops_per_step", "compile_s", "optimizer_variables", "optimizer_bytes",
    "rss_ratio_to_full", "optimizer_bytes_ratio_to_full", "x_floor", "train_rss_mb", "train_rss_ratio_to_full",
}


def run_bench(args, out, timeout):
    """`python -m lora3.bench *args` on this pass's backend: (the finished process, its JSON report)."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    proc = subprocess.run([sys.executable, "-m", "lora3.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = [
        "--model", "tiny", "--batch", "2", "--enc-len", "8", "--dec-len", "4",
        "--repeats", "1", "--warmup", "1", "--steps", "1",
        "--setups", "full,lora3-all_linear,peft-all_linear",
        "--rank", "4", "--ranks", "2,4", "--rank-targets", "qv,all_linear", "--rank-backends", BACKEND,
        "--round-robin", "full,frozen-floor,lora3-all_linear",
        "--backends", ",".join(BACKENDS), "--inference-backends", BACKEND,
        "--inference-targets", "all_linear", "--inference-rounds", "1", "--generate-rounds", "1", "--generate-variants", "base",
        "--prepare", "2", "--out", str(out),
    ]
    return run_bench(args, out, timeout=600)


def test_exits_zero_and_prints_tables(bench):
    proc, _ = bench
    assert "training step" in proc.stdout
    assert "rank scaling" in proc.stdout
    assert "inference" in proc.stdout
    assert "targets\n" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("setup") and "s/step" in line)
    assert "/full  x floor" in header  # the step over the frozen-floor step, beside the step over full


def test_timed_steps_never_overlap_another_process_at_work(bench):
    """With --prepare 2, two processes import/build/compile at once, but while one times its steps
    every other live process waits at its gate (or has exited)."""
    _, report = bench
    assert report["meta"]["prepare"] == 2
    runs = [r for r in report["raw"] if "timed_start_unix" in r]
    assert len(runs) >= 4
    for r in runs:
        assert r["started_unix"] <= r["ready_unix"] <= r["timed_start_unix"] <= r["timed_end_unix"]
    for x in runs:
        for y in runs:
            if x is y:
                continue
            # y's untimed work [started, ready] must not intersect x's timed window.
            busy_during_timing = y["started_unix"] < x["timed_end_unix"] and x["timed_start_unix"] < y["ready_unix"]
            assert not busy_during_timing, (x["setup"], x["backend"], y["setup"], y["backend"])
            # and two timed windows never overlap
            assert x["timed_end_unix"] <= y["timed_start_unix"] or y["timed_end_unix"] <= x["timed_start_unix"]
    # the gate did let two processes prepare at once at least once
    assert any(y["started_unix"] < x["ready_unix"] and x["started_unix"] < y["ready_unix"]
               for x in runs for y in runs if x is not y)


def test_records_have_the_issue_fields(bench):
    _, report = bench
    names = {(r["name"], r["backend"]) for r in report["records"]}
    for backend in BACKENDS:
        assert ("full", backend) in names and ("lora3-all_linear", backend) in names
    for r in report["records"]:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["median_step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["optimizer_variables"] > 0 and r["optimizer_bytes"] > 0
        assert 0 < r["train_rss_mb"] < r["peak_rss_mb"]
    recs = {(r["name"], r["backend"]): r for r in report["records"]}
    for backend in BACKENDS:
        full, lora = recs[("full", backend)], recs[("lora3-all_linear", backend)]
        assert full["ratio_to_full"] == pytest.approx(1.0)
        assert lora["trainable_params"] < full["trainable_params"] == full["total_params"]
        assert lora["optimizer_bytes"] < full["optimizer_bytes"]
        assert lora["rank"] == 4 and lora["adapted_layers"] > 0
        assert "ratio_to_keras" in lora and "ratio_to_peft" in lora
        if backend == "jax":  # XLA cost analysis
            assert full["flops_per_step"] > lora["flops_per_step"] > 0


def test_peft_record_or_skip_note(bench):
    _, report = bench
    recs = {(r["name"], r["backend"]): r for r in report["records"]}
    if HAVE_PEFT:
        peft = recs[("peft-all_linear", "torch")]
        lora = recs[("lora3-all_linear", BACKEND)]
        # Same model, same adapted layers: same parameter counts as lora3's.
        assert peft["trainable_params"] == lora["trainable_params"]
        assert peft["total_params"] == lora["total_params"]
        assert lora["ratio_to_peft"] > 0
    else:
        assert any(s["name"] == "peft-all_linear" for s in report["skipped"])


def test_rank_scaling_inference_targets_meta(bench):
    _, report = bench
    sweep = {(r["targets"], r["rank"]): r for r in report["rank_scaling"] if r["backend"] == BACKEND}
    # every rank on every target set, timed round-robin in one process
    assert sorted(sweep) == [("all_linear", 2), ("all_linear", 4), ("qv", 2), ("qv", 4)]
    sweeps = [r for r in report["raw"] if r["setup"] == "rank-sweep"]
    assert len(sweeps) == 1 and [len(p["step_times_s"]) for p in sweeps[0]["points"]] == [1] * 4
    for targets in ("qv", "all_linear"):
        r2, r4 = sweep[targets, 2], sweep[targets, 4]
        assert r4["ratio_to_r4"] == pytest.approx(1.0) and r4["flops_ratio_to_r4"] == pytest.approx(1.0)
        assert r2["trainable_params"] * 2 == r4["trainable_params"]
        assert r2["flops_per_step"] < r4["flops_per_step"]  # XLA counted the rank-r products
    assert sweep["qv", 4]["trainable_params"] < sweep["all_linear", 4]["trainable_params"]
    assert sweep["qv", 4]["flops_per_step"] < sweep["all_linear", 4]["flops_per_step"]
    variants = {v["variant"]: v for v in report["inference"]}
    assert set(variants) == {"base", "all_linear-unmerged", "all_linear-merged"}
    assert variants["base"]["forward_ratio_to_base"] == pytest.approx(1.0)
    for v in variants.values():
        assert v["median_forward_s"] > 0
    assert variants["base"]["generate_tokens_per_s"] > 0
    # Merging changes no result beyond float rounding.
    assert variants["all_linear-merged"]["max_abs_diff_vs_unmerged"] < 1e-3
    assert all({"target", "value", "limit", "ok"} <= set(t) for t in report["targets"])
    machine = report["meta"]["machine"]
    assert machine["nproc"] >= 1 and machine["versions"]["keras"]
    assert report["failures"] == [] and report["meta"]["wall_s"] > 0


def test_round_robin_times_the_chosen_setups_side_by_side(bench):
    """--round-robin: one process per backend times the chosen setups in turn; ratios within it."""
    _, report = bench
    raw = [r for r in report["raw"] if r["setup"] == "round-robin"]
    assert sorted(r["backend"] for r in raw) == sorted(BACKENDS)  # one process per backend
    for r in raw:
        assert [(p["setup"], len(p["step_times_s"])) for p in r["points"]] == [
            ("full", 1), ("frozen-floor", 1), ("lora3-all_linear", 1)]
    rr = {(r["name"], r["backend"]): r for r in report["round_robin"]}
    for backend in BACKENDS:
        full, lora = rr["full", backend], rr["lora3-all_linear", backend]
        assert full["ratio_to_full"] == pytest.approx(1.0)
        assert lora["ratio_to_full"] == pytest.approx(lora["median_step_s"] / full["median_step_s"])
        assert lora["trainable_params"] < full["trainable_params"]
        assert rr["frozen-floor", backend]["x_floor"] == pytest.approx(1.0)
        labels = {t["target"] for t in report["targets"]}
        assert f"{backend}: all_linear step / full step (one process)" in labels
        # the CPU floor targets (FLAN-T5-small's): one-process value here; the per-process one has no floor run
        floor = {t["target"]: t for t in report["targets"] if "frozen-floor" in t["target"]}
        one = floor[f"{backend}: all_linear step / frozen-floor step (one process)"]
        assert one["value"] == pytest.approx(lora["median_step_s"] / rr["frozen-floor", backend]["median_step_s"])
        assert one["limit"] == {"jax": 1.10, "tensorflow": 1.15}[backend]
        assert floor[f"{backend}: all_linear step / frozen-floor step"]["ok"] is None
    assert "jax: qv step / frozen-floor step" in labels and "tensorflow: qv step / frozen-floor step" not in labels


# -- --model gemma3_270m, through its random stand-in gemma3_tiny --------------------------------------

GEMMA_SETUPS = ["lora3-all_linear", "lora3-all_linear-full_logits", "lora3-all_linear-remat", "peft-all_linear"]


@pytest.fixture(scope="module")
def gemma_bench(tmp_path_factory):
    """The decoder-only bench at a tiny Gemma 3 (random weights; the real 270M is never loaded here)."""
    out = tmp_path_factory.mktemp("gemma_bench") / "bench.json"
    args = ["--model", "gemma3_tiny", "--batch", "2", "--prompt-len", "5", "--completion-len", "3",
            "--warmup", "2", "--steps", "1", "--setups", ",".join(GEMMA_SETUPS), "--prepare", "3",
            "--flops", "none", "--out", str(out)]
    return run_bench(args, out, timeout=300)


def test_gemma_records_ratios_and_targets(gemma_bench):
    proc, report = gemma_bench
    assert report["meta"]["causal"] and "--model gemma3_tiny" in report["meta"]["command"]
    assert report["meta"]["args"]["backends"] == ["jax"]  # the model's own defaults
    assert report["rank_scaling"] == [] and report["inference"] == []
    recs = {r["name"]: r for r in report["records"]}
    expected = {"lora3-all_linear", "lora3-all_linear-full_logits", "lora3-all_linear-remat"} | (
        {"peft-all_linear"} if HAVE_PEFT else set())
    assert set(recs) == expected
    lora, logits = recs["lora3-all_linear"], recs["lora3-all_linear-full_logits"]
    for r in recs.values():
        assert r["median_step_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * (1 + 5 + 3) / r["median_step_s"])
        assert r["first_call_s"] > 0 and len(r["warmup_steps_s"]) == 1  # compile and warm-up, apart
    # same adapter, only the loss differs
    assert lora["trainable_params"] == logits["trainable_params"] > 0
    assert lora["adapted_layers"] == logits["adapted_layers"] == 2 * 7
    assert lora["ratio_to_full_logits"] == pytest.approx(lora["median_step_s"] / logits["median_step_s"])
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["jax: lora3 step / full-logit step"]["value"] == pytest.approx(lora["ratio_to_full_logits"])
    assert targets["jax: lora3 step / full-logit step"]["limit"] == 0.65
    assert {"jax: lora3 step / PEFT step", "jax: lora3 peak RSS / PEFT peak RSS"} <= set(targets)
    if HAVE_PEFT:
        peft = recs["peft-all_linear"]
        assert peft["backend"] == "torch" and peft["adapted_layers"] == lora["adapted_layers"]
        assert peft["trainable_params"] == lora["trainable_params"]  # q,k,v,o,gate,up,down at the same rank
        assert targets["jax: lora3 peak RSS / PEFT peak RSS"]["value"] == pytest.approx(
            lora["peak_rss_mb"] / peft["peak_rss_mb"])
    else:
        assert any(s["name"] == "peft-all_linear" for s in report["skipped"])
    assert "/full-logits" in proc.stdout and "q and v only" in proc.stdout
    # trainer.remat=full beside the same setup: same adapter, its ratios and targets
    remat = recs["lora3-all_linear-remat"]
    assert remat["trainable_params"] == lora["trainable_params"] and remat["adapted_layers"] == lora["adapted_layers"]
    assert remat["ratio_to_no_remat"] == pytest.approx(remat["median_step_s"] / lora["median_step_s"])
    assert remat["train_memory_source"] == "peak RSS - RSS after build"  # no accelerator here
    assert remat["train_memory_mb"] == remat["train_rss_mb"]
    step = targets["jax: lora3-all_linear-remat: remat step / no-remat step"]
    assert step["limit"] == 1.35 and step["value"] == pytest.approx(remat["ratio_to_no_remat"])
    assert "rematerialisation (trainer.remat=full)" in proc.stdout


def test_model_defaults():
    from lora3.bench import cli
    from lora3.bench.setups.common import CAUSAL_SETUPS, SETUPS

    small = cli.parse_args([])
    assert (small.model, small.setups, small.backends, small.ranks, small.inference_backends) == (
        "small", list(SETUPS), ["jax", "tensorflow"], [1, 4, 16, 64, 256], ["jax"])
    assert (small.steps, small.warmup, small.repeats) == (5, 2, 1)
    gemma = cli.parse_args(["--model", "gemma3_270m"])
    assert gemma.setups == list(CAUSAL_SETUPS) and gemma.backends == ["jax"]
    assert gemma.ranks == [] and gemma.inference_backends == [] and (gemma.steps, gemma.warmup) == (3, 2)
    assert cli.plan_jobs(gemma)[0][-1][2] == "peft-all_linear" or not HAVE_PEFT
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "gemma3_270m", "--setups", "frozen-floor"])  # a T5 setup
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "small", "--setups", "lora3-all_linear-full_logits"])
    # remat is opt-in on either model family, never in the defaults (the default bench keeps its time)
    assert "lora3-all_linear-remat" not in small.setups + gemma.setups
    for model in ("small", "gemma3_270m"):
        assert cli.parse_args(["--model", model, "--setups", "lora3-all_linear-remat"]).setups == [
            "lora3-all_linear-remat"]


def test_remat_targets_from_records():
    from lora3.bench import cli

    args = cli.parse_args(["--model", "tiny", "--backends", "jax,tensorflow"])
    rec = lambda name, backend, s, mem, device=None: {  # noqa: E731
        "name": name, "backend": backend, "median_step_s": s, "peak_rss_mb": 1.0, "optimizer_bytes": 1,
        "train_memory_mb": device or mem,
        "train_memory_source": "peak device memory" if device else "peak RSS - RSS after build"}
    records = [rec("lora3-all_linear", "jax", 1.0, 100.0, 1000.0), rec("lora3-all_linear-remat", "jax", 1.3, 90.0, 500.0),
               rec("lora3-all_linear", "tensorflow", 1.0, 100.0), rec("lora3-all_linear-remat", "tensorflow", 1.5, 90.0)]
    t = {x["target"]: x for x in cli.check_targets(records, [], [], [], args)}
    jax_mem = t["jax: lora3-all_linear-remat: remat training memory / no-remat (peak device memory)"]
    assert jax_mem["value"] == pytest.approx(0.5) and jax_mem["ok"] is True
    assert t["jax: lora3-all_linear-remat: remat step / no-remat step"]["ok"] is True
    tf_mem = t["tensorflow: lora3-all_linear-remat: remat training memory / no-remat (peak RSS - RSS after build)"]
    assert tf_mem["value"] == pytest.approx(0.9) and tf_mem["ok"] is False
    assert t["tensorflow: lora3-all_linear-remat: remat step / no-remat step"]["ok"] is False


def test_floor_targets_from_records():
    from lora3.bench import cli

    args = cli.parse_args(["--model", "tiny", "--backends", "jax,tensorflow"])
    rec = lambda name, backend, s: {"name": name, "backend": backend, "median_step_s": s,  # noqa: E731
                                    "peak_rss_mb": 1.0, "optimizer_bytes": 1}
    records = [rec("frozen-floor", "jax", 1.0), rec("lora3-qv", "jax", 1.04), rec("lora3-all_linear", "jax", 1.2),
               rec("frozen-floor", "tensorflow", 1.0), rec("lora3-all_linear", "tensorflow", 1.12)]
    t = {x["target"]: x for x in cli.check_targets(records, [], [], [], args)}
    assert t["jax: qv step / frozen-floor step"]["ok"] is True
    assert t["jax: all_linear step / frozen-floor step"]["ok"] is False
    assert t["jax: all_linear step / frozen-floor step"]["value"] == pytest.approx(1.2)
    assert t["tensorflow: all_linear step / frozen-floor step"]["ok"] is True


def test_causal_batch_loss_on_the_completion_only():
    """The study's packing (lora3.run.models._pack_causal) of full-length pairs: both losses see the same
    positions and labels."""
    from lora3.bench.setups.common import causal_batch

    spec = {"seed": 0, "batch": 3, "prompt_len": 6, "completion_len": 4, "model": "gemma3_tiny"}
    x, y, w = causal_batch(spec)
    xf, yf, wf = causal_batch(spec, full_logits=True)
    assert x["token_ids"].shape == (3, 11) and (x["token_ids"][:, 0] == 2).all()
    assert x["padding_mask"][:, :10].all() and not x["padding_mask"][:, 10].any()
    assert (x["loss_positions"] == np.arange(6, 10)).all() and w.shape == (3, 4) and w.all()
    assert (x["loss_labels"] == y).all()
    # position i predicts token i + 1
    assert (y[:, :3] == x["token_ids"][:, 7:10]).all()
    assert (xf["token_ids"] == x["token_ids"]).all()
    assert (wf.sum(1) == 4).all() and (wf[:, 6:10] == 1).all()
    assert (yf[:, 6:10] == y).all()
