"""What a run leaves behind: config.yaml, samples.jsonl, metrics.json, the W&B summary and the
printed summary; and a sweep's sweep_summary.json. Every file is written atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

import lora3
from lora3.fileio import atomic_write_text
from lora3.run import backend


def write_config(out: Path, plain: Mapping[str, Any]) -> None:
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(dict(plain))))


def objective_value(metrics: Mapping[str, Any], objective: str) -> float:
    """The sweep objective ("best/val/bleu") read from metrics.json's sections; NaN if absent."""
    where, key = objective.split("/", 1)
    value = (metrics.get(where) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def announce(plain: Mapping[str, Any], keras, params: Mapping[str, Any], data, tracker) -> None:
    print(f"[lora3] {plain['model']['name']} on {keras.backend.backend()}: {params['total']:,} params, "
          f"{params['trainable']:,} trainable ({params['trainable_percent']:.3f}%); "
          f"data {data.info['name']} {len(data.train)} train / {len(data.valid)} valid pairs", flush=True)
    tracker.summary({"params/trainable": params["trainable"], "params/total": params["total"],
                     "params/trainable_percent": params["trainable_percent"]})


def _samples_jsonl(samples: list[dict], before: list[dict]) -> str:
    """One JSON line per translated pair, with the hypothesis before training when there was one."""
    before_h = {s["source"]: s["hypothesis"] for s in before}
    lines = [json.dumps({**s, **({"hypothesis_before": before_h[s["source"]]} if s["source"] in before_h else {})},
                        ensure_ascii=False) for s in samples]
    return "\n".join(lines) + ("\n" if lines else "")


def finish(plain, out: Path, job, keras, bundle, data, params, before, final_scores, result, saved,
           tracker, t_start) -> dict:
    """Writes samples.jsonl (and test_samples.jsonl), metrics.json and the W&B summary; prints the
    summary; returns the metrics."""
    outputs = dict(saved)
    samples = final_scores.get("samples", [])
    atomic_write_text(out / "samples.jsonl", _samples_jsonl(samples, before.get("samples", [])))
    outputs["samples"] = str(out / "samples.jsonl")
    if final_scores.get("test_samples"):
        atomic_write_text(out / "test_samples.jsonl",
                          _samples_jsonl(final_scores["test_samples"], before.get("test_samples", [])))
        outputs["test_samples"] = str(out / "test_samples.jsonl")
    steps = plain["trainer"]["max_steps"] if plain["finetune"] != "none" else 0
    if samples:
        tracker.table("val/samples", ["source", "reference", "hypothesis"],
                      [[s["source"], s["reference"], s["hypothesis"]] for s in samples[:50]], step=steps)

    final = {k: v for k, v in final_scores.items() if k.startswith(("val/", "test/"))}
    final.update({"train/loss": result["last"].get("train/loss")} if result["last"] else {})
    best = dict(result["best"]) or {k: v for k, v in final.items() if k in ("val/bleu", "val/chrf", "val/loss")}
    perf = {**result["perf"], **backend.peak_memory(), "wall_seconds": time.perf_counter() - t_start}
    outputs["wandb_run_dir"] = tracker.dir
    outputs["wandb_sync"] = tracker.sync_command()
    metrics = {
        "status": "finished",
        "backend": keras.backend.backend(),
        "lora3_version": lora3.__version__,
        "versions": backend.versions(),
        "devices": backend.devices(),
        "seed": plain["seed"],
        "lora_mode": plain["finetune"],
        "model": bundle.info,
        "data": data.info,
        "params": params,
        "steps": steps,
        "resumed_from": result["resumed_from"],
        "nonfinite_skipped": result.get("nonfinite_skipped", 0),
        "before": {k: v for k, v in before.items() if k.startswith(("val/", "test/"))},
        "final": final,
        "best": best,
        "history": result["history"],
        "perf": perf,
        "signatures": final_scores.get("signatures", {}),
        "outputs": outputs,
        "choices": dict(job.get("choices", {})),
    }
    metrics["objective"] = {"name": plain["objective"], "value": objective_value(metrics, plain["objective"])}
    tracker.summary({"train/nonfinite_skipped": metrics["nonfinite_skipped"]})
    tracker.summary({f"final/{k}": v for k, v in final.items() if v is not None})
    tracker.summary({f"best/{k}": v for k, v in best.items()})
    tracker.summary({f"before/{k}": v for k, v in metrics["before"].items()})
    tracker.summary({k: v for k, v in [("perf/tokens_per_s", perf.get("tokens_per_s")),
                                       ("perf/wall_seconds", perf["wall_seconds"]),
                                       ("perf/host_peak_rss_bytes", perf.get("host_peak_rss_bytes"))] if v is not None})
    if perf.get("tokens_per_s"):
        tracker.log({"perf/tokens_per_s": perf["tokens_per_s"]}, step=steps)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, ensure_ascii=False, default=str))
    print_summary(metrics, out)
    return metrics


def print_summary(m: dict, out: Path) -> None:
    b, f = m["before"], m["final"]
    lines = [
        "",
        f"[lora3] done in {m['perf']['wall_seconds']:.1f}s on {m['backend']}",
        f"  trainable     {m['params']['trainable']:,} of {m['params']['total']:,} params "
        f"({m['params']['trainable_percent']:.3f}%)",
    ]
    base = (m.get("model") or {}).get("base")
    if base:  # base-then-adapt (lora3.run.pretrain): what the base is and how it scores on the target task
        sv = base.get("source_val") or {}
        lines.append(f"  base          trained {base.get('steps')} steps on "
                     f"{(base.get('source_task') or {}).get('name')} (its own task: BLEU {sv.get('bleu', 0):.2f}); "
                     f"cached at {base.get('path')}")
        if "val/bleu" in b and "val/bleu" in f:
            tag = {"lora": "LoRA", "full": "full fine-tuning", "none": "frozen base"}.get(m.get("lora_mode"), "tuned")
            d = m.get("data") or {}
            lines.append(f"  target task   {d.get('name')}/{d.get('variant') or d.get('direction')}: "
                         f"frozen base BLEU {b['val/bleu']:.2f} | {tag} BLEU {f['val/bleu']:.2f} "
                         f"with {m['params']['trainable_percent']:.2f}% of the params trainable")
    if f.get("train/loss") is not None:
        lines.append(f"  train loss    {f['train/loss']:.4f} (per-token cross-entropy, mean over the last eval period)")
    if "val/loss" in f:
        lines.append(f"  val loss      {b.get('val/loss', float('nan')):.4f} -> {f['val/loss']:.4f} per token "
                     f"(perplexity {b.get('val/perplexity', float('nan')):.2f} -> {f.get('val/perplexity', float('nan')):.2f})")
    if "val/bleu" in f:
        lines.append(f"  val BLEU      {b.get('val/bleu', float('nan')):.2f} -> {f['val/bleu']:.2f} "
                     f"(best {m['best'].get('val/bleu', f['val/bleu']):.2f})")
        lines.append(f"  val chrF      {b.get('val/chrf', float('nan')):.2f} -> {f['val/chrf']:.2f}")
    if "test/bleu" in f:
        lines.append(f"  test BLEU     {b.get('test/bleu', float('nan')):.2f} -> {f['test/bleu']:.2f}")
        lines.append(f"  test chrF     {b.get('test/chrf', float('nan')):.2f} -> {f['test/chrf']:.2f}")
    if m["perf"].get("tokens_per_s"):
        lines.append(f"  speed         {m['perf']['tokens_per_s']:,.0f} tokens/s")
    if f.get("val/sentences_per_s"):
        lines.append(f"  generation    {f['val/sentences_per_s']:.2f} sentences/s (greedy, batch of the eval)")
    for key in ("adapter", "adapter_peft", "model"):
        if key in m["outputs"]:
            lines.append(f"  {key:<13} {m['outputs'][key]}")
    lines.append(f"  metrics       {out / 'metrics.json'}")
    if m["outputs"].get("wandb_run_dir"):
        lines.append(f"  W&B run       {m['outputs']['wandb_run_dir']}")
    if m["outputs"].get("wandb_sync"):
        lines.append(f"  upload with   {m['outputs']['wandb_sync']}")
    print("\n".join(lines), flush=True)


def summarize_sweep(sweep_dir: Path) -> dict:
    """Every job of a multirun: its status, overrides and scores (or error); writes sweep_summary.json."""
    jobs = []
    for d in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()),
                    key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        try:
            overrides = list(OmegaConf.load(d / ".hydra" / "overrides.yaml"))
        except (OSError, ValueError):
            overrides = []
        entry = {"job": d.name, "dir": str(d), "overrides": " ".join(overrides), "backend": None}
        if (d / "metrics.json").is_file():
            m = json.loads((d / "metrics.json").read_text())
            entry.update(status="finished", backend=m.get("backend"), best_val_bleu=m["best"].get("val/bleu"),
                         final=m.get("final"), objective=m.get("objective", {}).get("value"),
                         trainable_percent=m["params"]["trainable_percent"])
        elif (d / "error.json").is_file():
            entry.update(status="failed", error=json.loads((d / "error.json").read_text()).get("error"))
        else:
            entry.update(status="failed", error="no metrics.json or error.json (killed?)")
        jobs.append(entry)
    summary = {"sweep_dir": str(sweep_dir), "jobs": jobs}
    atomic_write_text(sweep_dir / "sweep_summary.json", json.dumps(summary, indent=1, default=str))
    return summary
