#!/usr/bin/env python
"""Collects lora3 runs and writes report.md, runs.csv and PNG plots.

    python scripts/report.py multirun/2026-01-01/12-00-00                 # one sweep dir
    python scripts/report.py multirun/a multirun/b --out experiments/rank_alpha   # a sweep run in pieces
    python scripts/report.py outputs/ --wandb-files                       # read offline W&B files, not metrics.json
    python scripts/report.py wandb:<entity>/<project> --out report/       # the W&B API (online)
    python scripts/report.py dashboard --project lora3 --sweep-group rank_alpha --out dash.json  # W&B workspace spec
    python scripts/report.py dashboard --project lora3 --entity me --sweep-group rank_alpha --publish  # save it (online)

A *run directory* is any directory under the given ones that holds `metrics.json` (a finished run),
`error.json` (a failed job), or Hydra's `.hydra/` or a `wandb/offline-run-*` (a job that was
killed before writing either). Failed and killed runs appear in the report with their error; they
are never dropped. The config of a run (rank, alpha, targets, ...) comes from its `config.yaml`
(resolved, written by lora3.run) or `.hydra/config.yaml`.

Outputs in --out (default: the first directory given):
- `report.md`: one row per run (model, backend, mode, rank, alpha, targets, rsLoRA, seed,
  trainable share, best val BLEU/chrF, final val loss, tokens/s, status or error), then a table
  of means over seeds per configuration;
- `runs.csv`: the same rows;
- `bleu_vs_rank.png`: best val BLEU against rank, one line per (targets, alpha rule, rsLoRA),
  with the `full` and `none` baselines as horizontal lines (mean over seeds; bars: min..max);
- `val_loss.png`: validation loss curves of every finished run.

`dashboard` (a subcommand; a directory named `dashboard` is still a source) writes the W&B workspace of
a sweep as code: best val BLEU vs rank (one line per alpha), BLEU vs trainable share, val loss by
sweep group, parallel coordinates rank/alpha/targets/lr -> BLEU; see `dashboard --help`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from lora3.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLUMNS = ["run", "status", "model", "backend", "mode", "rank", "alpha", "targets", "rslora", "variant", "lr", "seed",
           "trainable", "trainable_pct", "bleu_before", "best_bleu", "best_chrf", "final_bleu", "final_val_loss",
           "tokens_per_s", "wall_s", "error"]


# ---------------------------------------------------------------- collecting


def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable interpolation (hydra's ${now:...}): take it raw
        return OmegaConf.to_container(cfg, resolve=False)


def _config_of(d: Path) -> dict:
    for f in (d / "config.yaml", d / ".hydra" / "config.yaml"):
        if f.is_file():
            try:
                return _load_yaml(f)
            except Exception:
                continue
    return {}


def _is_run_dir(d: Path) -> bool:
    return ((d / "metrics.json").is_file() or (d / "error.json").is_file() or (d / ".hydra").is_dir()
            or any((d / "wandb").glob("offline-run-*")))


def find_run_dirs(roots: list[Path]) -> list[Path]:
    found = []
    for root in roots:
        root = Path(root)
        if _is_run_dir(root):
            found.append(root)
        for dirpath, dirnames, _ in os.walk(root):
            dirnames[:] = sorted(n for n in dirnames if n not in ("wandb", "checkpoints", "adapter", "model",
                                                                  ".hydra", ".submitit", "__pycache__"))
            for n in dirnames:
                d = Path(dirpath) / n
                if _is_run_dir(d):
                    found.append(d)
    seen, out = set(), []
    for d in found:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def row_from_metrics(name: str, m: dict, cfg: dict) -> dict:
    lora = cfg.get("lora") or {}
    mode = m.get("lora_mode") or cfg.get("finetune") or lora.get("mode")
    params = m.get("params") or {}
    hist = [h for h in m.get("history") or [] if h.get("val/loss") is not None]
    return {
        "run": name, "status": m.get("status", "finished"),
        "model": (m.get("model") or {}).get("name") or (cfg.get("model") or {}).get("name"),
        "backend": m.get("backend") or cfg.get("backend"), "mode": mode,
        "rank": lora.get("rank") if mode == "lora" else None,
        "alpha": lora.get("alpha") if mode == "lora" else None,
        "targets": _targets_str(lora.get("targets")) if mode == "lora" else None,
        "rslora": bool(lora.get("rslora")) if mode == "lora" else None,
        "variant": variant_of(lora, cfg.get("trainer") or {}) if mode == "lora" else None,
        "seed": m.get("seed", cfg.get("seed")), "lr": _num((cfg.get("trainer") or {}).get("lr")),
        "trainable": params.get("trainable"), "trainable_pct": _num(params.get("trainable_percent")),
        "bleu_before": _num((m.get("before") or {}).get("val/bleu")),
        "best_bleu": _num((m.get("best") or {}).get("val/bleu")),
        "best_chrf": _num((m.get("best") or {}).get("val/chrf")),
        "final_bleu": _num((m.get("final") or {}).get("val/bleu")),
        "final_val_loss": _num((m.get("final") or {}).get("val/loss")),
        "tokens_per_s": _num((m.get("perf") or {}).get("tokens_per_s")),
        "wall_s": _num((m.get("perf") or {}).get("wall_seconds")),
        "error": None,
        "curve": ([(0, m["before"]["val/loss"])] if hist and (m.get("before") or {}).get("val/loss") is not None
                  else []) + [(h["step"], h["val/loss"]) for h in hist],
    }


_INIT_NAMES = {"pissa": "PiSSA", "olora": "OLoRA", "gaussian": "gaussian init"}


def variant_of(lora: dict, trainer: dict) -> str:
    """The LoRA variant a run used, one label: `plain`, or its parts joined by `+`
    (`rsLoRA`, `DoRA`, `PiSSA` / `PiSSA(niter 4)` / `OLoRA` / `gaussian init`, `LoRA+x16`, `int8 base`).

    Works on a nested config (`lora`, `trainer` dicts) and on W&B's flat one (pass the same
    keys without their group prefix)."""
    parts = []
    if lora.get("rslora"):
        parts.append("rsLoRA")
    if lora.get("dora"):
        parts.append("DoRA")
    init = lora.get("init") or "kaiming"
    if init != "kaiming":
        niter = re.fullmatch(r"pissa_niter_([0-9]+)", str(init))
        parts.append(f"PiSSA(niter {niter.group(1)})" if niter else _INIT_NAMES.get(init, str(init)))
    ratio = _num(trainer.get("lora_plus_ratio"))
    if ratio is not None:
        parts.append(f"LoRA+x{ratio:g}")
    quant = lora.get("base_quantization")
    if quant and quant != "none":
        parts.append(f"{quant} base")
    return "+".join(parts) or "plain"


def _targets_str(t):
    if isinstance(t, (list, tuple)):
        return ",".join(map(str, t))
    return t


def row_from_wandb(name: str, rec: dict, cfg: dict | None = None) -> dict:
    """A row from an offline W&B run (`lora3.run.tracking.read_offline_run`) or an API run's config/summary."""
    c = dict(rec.get("config") or {})
    s = dict(rec.get("summary") or {})

    def summ(key, agg=None):
        v = s.get(key)
        if isinstance(v, dict):
            v = v.get(agg) if agg else None
        return _num(v)

    mode = c.get("finetune") or c.get("lora.mode")  # `finetune` in newer configs, `lora.mode` in older ones
    state = rec.get("state") or ("finished" if s else "unknown")
    return {
        "run": name, "status": "finished" if state == "finished" else "failed",
        "model": c.get("model.name"), "backend": c.get("backend"), "mode": mode,
        "rank": c.get("lora.rank") if mode == "lora" else None,
        "alpha": c.get("lora.alpha") if mode == "lora" else None,
        "targets": _targets_str(c.get("lora.targets")) if mode == "lora" else None,
        "rslora": bool(c.get("lora.rslora")) if mode == "lora" else None,
        "variant": variant_of({k[5:]: v for k, v in c.items() if k.startswith("lora.")},
                              {k[8:]: v for k, v in c.items() if k.startswith("trainer.")}) if mode == "lora" else None,
        "seed": c.get("seed"), "lr": _num(c.get("trainer.lr")),
        "trainable": None if summ("params/trainable") is None else int(summ("params/trainable")),
        "trainable_pct": summ("params/trainable_percent"),
        "bleu_before": summ("before/val/bleu"),
        "best_bleu": summ("best/val/bleu") if summ("best/val/bleu") is not None else summ("val/bleu", "max"),
        "best_chrf": summ("best/val/chrf") if summ("best/val/chrf") is not None else summ("val/chrf", "max"),
        "final_bleu": summ("final/val/bleu"), "final_val_loss": summ("final/val/loss"),
        "tokens_per_s": summ("perf/tokens_per_s"), "wall_s": summ("perf/wall_seconds"),
        "error": None if state == "finished" else f"W&B run state: {state}",
        "curve": list(rec.get("curve") or []),
    }


def collect_dirs(roots: list[Path], wandb_files: bool = False) -> list[dict]:
    """One row per run directory under `roots`."""
    from lora3.run import tracking

    rows = []
    for d in find_run_dirs(roots):
        name = _rel_name(d, roots)
        cfg = _config_of(d)
        wb = tracking.find_offline_runs(d)
        if (d / "metrics.json").is_file() and not (wandb_files and wb):
            try:
                rows.append(row_from_metrics(name, json.loads((d / "metrics.json").read_text()), cfg))
                continue
            except (ValueError, OSError) as e:
                rows.append(_failed(name, cfg, f"unreadable metrics.json: {e}"))
                continue
        if (d / "error.json").is_file():
            try:
                err = json.loads((d / "error.json").read_text()).get("error")
            except (ValueError, OSError) as e:
                err = f"unreadable error.json: {e}"
            rows.append(_failed(name, cfg, err))
            continue
        if wb:
            try:
                rec = tracking.read_offline_run(wb[-1])
                row = row_from_wandb(name, rec, cfg)
                if not (d / "metrics.json").is_file() and row["status"] == "finished":
                    row.update(status="failed", error="no metrics.json (the W&B run finished, the job did not)")
                elif not (d / "metrics.json").is_file():
                    row.update(status="incomplete",
                               error=f"no metrics.json or error.json (killed, or still running); {row['error']}")
                rows.append(row)
                continue
            except Exception as e:  # unreadable W&B files: still a row
                rows.append(_failed(name, cfg, f"no metrics.json; W&B files unreadable: {e}"))
                continue
        rows.append({**_failed(name, cfg, "no metrics.json or error.json (killed, or still running)"),
                     "status": "incomplete"})
    return rows


def _failed(name, cfg, error) -> dict:
    lora = cfg.get("lora") or {}
    mode = cfg.get("finetune") or lora.get("mode")
    row = {k: None for k in COLUMNS}
    row.update(run=name, status="failed", model=(cfg.get("model") or {}).get("name"), backend=cfg.get("backend"),
               mode=mode, seed=cfg.get("seed"), error=str(error), curve=[])
    if mode == "lora":
        row.update(rank=lora.get("rank"), alpha=lora.get("alpha"), targets=_targets_str(lora.get("targets")),
                   rslora=bool(lora.get("rslora")), variant=variant_of(lora, cfg.get("trainer") or {}))
    return row


def _rel_name(d: Path, roots: list[Path]) -> str:
    for r in roots:
        try:
            rel = d.resolve().relative_to(Path(r).resolve())
            base = Path(r).resolve().name
            return f"{base}/{rel}" if str(rel) != "." else base
        except ValueError:
            continue
    return str(d)


def collect_wandb_api(project: str) -> list[dict]:
    """Runs of an online W&B project `entity/project` (needs `wandb login`)."""
    import wandb

    api = wandb.Api()
    rows = []
    for run in api.runs(project):
        rec = {"config": dict(run.config), "summary": dict(run.summary), "state": run.state}
        try:
            rec["curve"] = [(int(h["_step"]), float(h["val/loss"])) for h in run.scan_history(keys=["_step", "val/loss"])
                            if h.get("val/loss") is not None]
        except Exception:
            rec["curve"] = []
        row = row_from_wandb(run.name, rec)
        if row["status"] != "finished":
            row["error"] = f"W&B run state: {run.state}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------- writing


def _fmt(v, digits=2):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def config_label(r: dict, common_lr=None) -> str:
    lr = f" lr={r['lr']:g}" if r.get("lr") is not None and common_lr is not None and r["lr"] != common_lr else ""
    if r.get("mode") != "lora":
        return str(r.get("mode")) + lr
    variant = r.get("variant") or ("rsLoRA" if r.get("rslora") else "plain")
    return f"{r['targets']} r={r['rank']} α={_fmt(_num(r['alpha']), 0)}{'' if variant == 'plain' else ' ' + variant}{lr}"


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean/std/min/max of best BLEU over seeds per (model, backend, mode, targets, rank, alpha, rslora)."""
    groups = defaultdict(list)
    lrs = [r.get("lr") for r in rows if r.get("lr") is not None]
    common_lr = max(set(lrs), key=lrs.count) if lrs else None
    for r in rows:
        if r["status"] == "finished" and r.get("best_bleu") is not None:
            key = (r.get("model"), r.get("mode"), r.get("targets"), r.get("rank"), _num(r.get("alpha")), r.get("rslora"),
                   r.get("lr"), r.get("variant"))
            groups[key].append(r)
    out = []
    for key, rs in groups.items():
        b = [r["best_bleu"] for r in rs]
        c = [r["best_chrf"] for r in rs if r.get("best_chrf") is not None]
        out.append({"label": config_label(rs[0], common_lr), "lr": key[6], "common_lr": key[6] in (None, common_lr),
                    "model": key[0], "mode": key[1], "targets": key[2], "rank": key[3],
                    "alpha": key[4], "rslora": key[5], "variant": key[7], "n": len(rs), "bleu_mean": statistics.fmean(b),
                    "bleu_std": statistics.stdev(b) if len(b) > 1 else 0.0, "bleu_min": min(b), "bleu_max": max(b),
                    "chrf_mean": statistics.fmean(c) if c else None,
                    "trainable_pct": rs[0].get("trainable_pct")})
    order = {"none": 0, "lora": 1, "full": 2}
    out.sort(key=lambda a: (order.get(a["mode"], 3), str(a["targets"]), bool(a["rslora"]), str(a["variant"]),
                            a["rank"] or 0, a["alpha"] or 0))
    return out


def _std(a: dict) -> str:
    return f"{a['bleu_std']:.2f}" if a["n"] > 1 else "–"


def write_markdown(rows: list[dict], aggs: list[dict], path: Path, sources: list[str]):
    failed = [r for r in rows if r["status"] != "finished"]
    lines = [
        "# lora3 runs",
        "",
        f"Collected by `scripts/report.py` from: {', '.join(f'`{s}`' for s in sources)}. "
        f"{len(rows)} runs: {len(rows) - len(failed)} finished, {len(failed)} failed or incomplete "
        "(listed below with their error).",
        "BLEU/chrF: sacrebleu corpus scores on the fixed validation subset (`eval.num_samples`); "
        "best = best evaluation during training; loss = teacher-forced validation loss at the end.",
        "",
    ]
    if aggs:
        ref = {(a["model"], a["mode"]): a["bleu_mean"] for a in aggs
               if a["mode"] in ("full", "none") and a["common_lr"]}
        lines += ["## Per configuration (mean over seeds)", "",
                  "`of full` = mean best BLEU / full fine-tuning's; `gap closed` = (BLEU − frozen base) / "
                  "(full − frozen base), both against the same model's `full` and `none` rows.", "",
                  "| config | model | trainable % | seeds | best BLEU mean | ± std | min | max | best chrF mean "
                  "| of full | gap closed |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for a in aggs:
            full, none = ref.get((a["model"], "full")), ref.get((a["model"], "none"))
            of_full = f"{100 * a['bleu_mean'] / full:.0f}%" if full else ""
            gap = (f"{100 * (a['bleu_mean'] - none) / (full - none):.0f}%"
                   if full is not None and none is not None and full != none else "")
            lines.append(f"| {a['label']} | {a['model']} | {_fmt(a['trainable_pct'], 3)} | {a['n']} | "
                         f"{a['bleu_mean']:.2f} | {_std(a)} | "
                         f"{a['bleu_min']:.2f} | {a['bleu_max']:.2f} | {_fmt(a['chrf_mean'])} | {of_full} | {gap} |")
        lines.append("")
    lines += ["## Every run", "",
              "| run | status | model | backend | mode | rank | alpha | targets | rsLoRA | variant | lr | seed | trainable | "
              "trainable % | BLEU before | best BLEU | best chrF | final val loss | tokens/s | error |",
              "|---|---|---|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        err = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")
        if len(err) > 200:
            err = err[:200] + "…"
        lines.append("| " + " | ".join([
            r["run"], r["status"], _fmt(r.get("model")), _fmt(r.get("backend")), _fmt(r.get("mode")),
            _fmt(r.get("rank")), _fmt(_num(r.get("alpha")), 0) if r.get("alpha") is not None else "",
            _fmt(r.get("targets")), _fmt(r.get("rslora")), _fmt(r.get("variant")),
            f"{r['lr']:g}" if r.get("lr") is not None else "",
            _fmt(r.get("seed")), _fmt(r.get("trainable")),
            _fmt(r.get("trainable_pct"), 3), _fmt(r.get("bleu_before")), _fmt(r.get("best_bleu")),
            _fmt(r.get("best_chrf")), _fmt(r.get("final_val_loss"), 4), _fmt(r.get("tokens_per_s"), 0), err,
        ]) + " |")
    lines += ["", "Plots: [BLEU vs rank](bleu_vs_rank.png), [validation loss](val_loss.png)", ""]
    path.write_text("\n".join(lines))


def write_csv(rows: list[dict], path: Path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})


def _alpha_rules(rank, alpha) -> list[str]:
    """Which alpha lines of a rank sweep a run sits on: α=r, α=2r, or a fixed α."""
    rules = []
    if alpha is None or rank is None:
        return rules
    if math.isclose(alpha, rank):
        rules.append("α=r")
    if math.isclose(alpha, 2 * rank):
        rules.append("α=2r")
    rules.append(f"α={alpha:g}")
    return rules


def series(aggs: list[dict]) -> dict:
    """Lines of the BLEU-vs-rank plot: {label: [(rank, mean, min, max), ...]}; a fixed-α line only
    where that α was run at more than one rank."""
    lines = defaultdict(dict)
    for a in aggs:
        if a["mode"] != "lora" or not a.get("common_lr", True):
            continue
        for rule in _alpha_rules(a["rank"], a["alpha"]):
            variant = a.get("variant") or ("rsLoRA" if a["rslora"] else "plain")
            label = f"{a['targets']} {rule}{'' if variant == 'plain' else ' ' + variant}"
            lines[label][a["rank"]] = (a["rank"], a["bleu_mean"], a["bleu_min"], a["bleu_max"])
    out = {}
    for label, pts in lines.items():
        fixed = "α=r" not in label and "α=2r" not in label
        # a fixed α that only coincides with r or 2r at a couple of ranks is not a line of the sweep
        if len(pts) < (3 if fixed else 2):
            continue
        out[label] = [pts[k] for k in sorted(pts)]
    # a fixed α equal to r or 2r at one rank duplicates that line's point only: keep it only with >1 rank
    return out


def plot(rows: list[dict], aggs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(10, 5))
    lines = series(aggs)
    for i, (label, pts) in enumerate(sorted(lines.items())):
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        style = "--" if "qv" in label else (":" if "rsLoRA" in label else "-")
        ax.errorbar(xs, ys, yerr=err, marker="o", linestyle=style, capsize=3, label=label)
    colors = {"full": "black", "none": "gray"}
    for a in aggs:
        if a["mode"] in ("full", "none") and a.get("common_lr", True):
            name = "full fine-tuning" if a["mode"] == "full" else "frozen base (none)"
            ax.axhline(a["bleu_mean"], color=colors[a["mode"]], linestyle="-." if a["mode"] == "full" else ":",
                       label=f"{name}: {a['bleu_mean']:.1f} (n={a['n']})")
            if a["n"] > 1:
                ax.axhspan(a["bleu_min"], a["bleu_max"], color=colors[a["mode"]], alpha=0.08)
    ax.set_xscale("log", base=2)
    ranks = sorted({p[0] for pts in lines.values() for p in pts})
    if ranks:
        ax.set_xticks(ranks)
        ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("best validation BLEU")
    ax.set_title("BLEU vs rank (mean over seeds; bars: min–max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = out / "bleu_vs_rank.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    fig, ax = plt.subplots(figsize=(8, 5))
    finished = sorted((r for r in rows if r["status"] == "finished" and r.get("curve")),
                      key=lambda r: (r["mode"] != "lora", r.get("rank") or 0, str(r.get("targets"))))
    cmap = plt.get_cmap("viridis")
    ranks = sorted({r["rank"] for r in finished if r.get("rank")})
    shown = set()
    for r in finished:
        xs, ys = zip(*r["curve"])
        if r["mode"] == "lora":
            c = cmap(ranks.index(r["rank"]) / max(1, len(ranks) - 1)) if r["rank"] in ranks else "C0"
            label = f"LoRA r={r['rank']}"
            style = "--" if r.get("targets") == "qv" else "-"
        else:
            c = "black" if r["mode"] == "full" else "gray"
            label, style = r["mode"], "-."
        ax.plot(xs, ys, color=c, linestyle=style, alpha=0.7, label=None if label in shown else label)
        shown.add(label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.set_title("Validation loss (LoRA coloured by rank; dashed: qv targets)")
    ax.grid(alpha=0.3)
    if shown:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    p = out / "val_loss.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    return written


# ---------------------------------------------------------------- W&B dashboard as code
#
# `python scripts/report.py dashboard --project lora3 [--entity E] [--sweep-group G] [--out spec.json] [--publish]`
# builds a W&B workspace (a saved view of a project) with the panels a LoRA sweep needs. The spec is
# plain data (`dashboard_spec`, no network, no W&B import); `to_workspace` turns it into a
# `wandb_workspaces` Workspace, whose wire form (`wire_view`) is what `--publish` saves.
#
# Every key is one the app logs (lora3/run: tracking, train, outputs); tests/scripts/test_dashboard.py
# checks them against a real offline run. The run config is the
# flattened resolved config, so `lora.rank` is one *flat* config key (stored as
# {"lora.rank": {"value": 8}}, backend path `lora.rank.value`); the summary has `best/val/bleu`
# and `params/trainable_percent`; the history has `val/loss` at each evaluation step; the W&B group
# is `wandb.group` or, in a multirun, the sweep's `<parent>_<sweep dir>`.

DASHBOARD_SCHEMA = "lora3.dashboard/1"

#: what the panels plot: name -> (section, key). section: config | summary | history | run
DASHBOARD_KEYS = {
    "rank": ("config", "lora.rank"),
    "alpha": ("config", "lora.alpha"),
    "targets": ("config", "lora.targets"),
    "lr": ("config", "trainer.lr"),
    "best_bleu": ("summary", "best/val/bleu"),
    "trainable_pct": ("summary", "params/trainable_percent"),
    "val_loss": ("history", "val/loss"),
    "step": ("history", "_step"),
    "group": ("run", "group"),
}


def _ref(name: str, keys: dict) -> dict:
    section, key = keys[name]
    return {"section": section, "key": key}


def dashboard_spec(project: str, entity: str | None = None, sweep_group: str | None = None, *,
                   name: str | None = None, keys: dict | None = None) -> dict:
    """The dashboard of a LoRA sweep as plain data (JSON-serialisable; no network, no W&B import).

    Panels: best val BLEU against rank, one line per alpha (a Vega line over runs) and the same
    points as a native scatter; best val BLEU against the trainable share; validation loss curves
    grouped by W&B group (the sweep); parallel coordinates rank, alpha, targets, lr -> best BLEU.
    `sweep_group` filters the runs to that W&B group. `keys` overrides entries of DASHBOARD_KEYS.
    """
    if not project:
        raise ValueError("a W&B project is needed")
    k = dict(DASHBOARD_KEYS, **(keys or {}))
    filters = []
    if sweep_group:
        filters.append({**_ref("group", k), "op": "=", "value": sweep_group})
    hparams = [_ref(n, k) for n in ("rank", "alpha", "targets", "lr")]
    panels = [
        {"id": "bleu_vs_rank", "type": "vega_line",
         "title": "best val BLEU vs LoRA rank (one line per alpha)",
         "chart": "wandb/line/v0", "x": _ref("rank", k), "y": _ref("best_bleu", k), "series": _ref("alpha", k)},
        {"id": "bleu_vs_rank_runs", "type": "scatter", "title": "best val BLEU vs LoRA rank (every run)",
         "x": _ref("rank", k), "y": _ref("best_bleu", k), "log_x": True},
        {"id": "bleu_vs_trainable", "type": "scatter", "title": "best val BLEU vs trainable share (%)",
         "x": _ref("trainable_pct", k), "y": _ref("best_bleu", k), "log_x": True},
        {"id": "val_loss", "type": "line", "title": "validation loss (grouped by sweep)",
         "x": _ref("step", k), "y": [_ref("val_loss", k)], "groupby": _ref("group", k),
         "aggregate": "mean", "range": "minmax", "log_y": True},
        {"id": "hparams", "type": "parallel_coordinates", "title": "rank, alpha, targets, lr -> best val BLEU",
         "columns": hparams + [_ref("best_bleu", k)]},
    ]
    columns = hparams + [_ref("best_bleu", k), _ref("trainable_pct", k)]
    return {
        "schema": DASHBOARD_SCHEMA, "kind": "workspace", "entity": entity, "project": project,
        "name": name or f"lora3 LoRA sweep{f' {sweep_group}' if sweep_group else ''}",
        "sweep_group": sweep_group, "filters": filters, "columns": columns,
        "sections": [{"name": "LoRA sweep", "panels": panels}],
    }


def dashboard_keys(spec: dict) -> set[tuple[str, str]]:
    """Every (section, key) the spec references: panels, columns and filters."""
    out = set()

    def add(ref):
        out.add((ref["section"], ref["key"]))

    for f in spec.get("filters", []):
        add(f)
    for c in spec.get("columns", []):
        add(c)
    for section in spec["sections"]:
        for p in section["panels"]:
            for field in ("x", "series", "groupby"):
                if p.get(field):
                    add(p[field])
            y = p.get("y")
            for ref in (y if isinstance(y, list) else [y] if y else []):
                add(ref)
            for ref in p.get("columns", []):
                add(ref)
    return out


def _wandb_workspaces():
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    return wr, ws


def _metric(ref: dict, wr):
    """A spec reference as a wandb_workspaces metric (for panels that take config/summary)."""
    if ref["section"] == "config":
        return wr.Config(ref["key"])
    if ref["section"] == "summary":
        return wr.SummaryMetric(ref["key"])
    if ref["section"] == "run":
        return wr.Metric({"group": "Group"}.get(ref["key"], ref["key"]))
    return ref["key"]  # history: a plain metric name


def _flat_config(ref: dict) -> str:
    """A flat dotted config key's backend accessor: `config:lora.rank.value` (the SDK would write
    `config:lora.value.rank`, the form of a *nested* config, which the app does not log)."""
    return f"config:{ref['key']}.value"


def to_workspace(spec: dict):
    """The spec as a `wandb_workspaces.workspaces.Workspace` (needs the `wandb-workspaces` package)."""
    wr, ws = _wandb_workspaces()

    class FlatConfigColumn(wr.ParallelCoordinatesPlotColumn):
        def _to_model(self):
            m = super()._to_model()
            if isinstance(self.metric, wr.Config):
                m.accessor = _flat_config({"key": self.metric.name})
            return m

    class FlatConfigScatter(wr.ScatterPlot):
        def _to_model(self):
            m = super()._to_model()
            for axis in ("x", "y"):
                if isinstance(getattr(self, axis), wr.Config):
                    setattr(m.config, f"{axis}_axis", _flat_config({"key": getattr(self, axis).name}))
            return m

    def history_name(ref):
        return {"_step": "Step"}.get(ref["key"], ref["key"])

    panels = []
    for p in spec["sections"][0]["panels"]:
        t = p["type"]
        if t == "vega_line":  # one point per run, one line per series value: the preset's x, y, stroke
            cfg = [r["key"] for r in (p["x"], p["series"]) if r["section"] == "config"]
            summ = [r["key"] for r in (p["x"], p["y"], p["series"]) if r["section"] == "summary"]
            panels.append(wr.CustomChart(
                query={"config": {"keys": cfg}, "summary": {"keys": summ}}, chart_name=p["chart"],
                chart_fields={"x": p["x"]["key"], "y": p["y"]["key"], "stroke": p["series"]["key"]},
                chart_strings={"title": p["title"]}))
        elif t == "scatter":
            panels.append(FlatConfigScatter(title=p["title"], x=_metric(p["x"], wr), y=_metric(p["y"], wr),
                                            log_x=p.get("log_x"), log_y=p.get("log_y")))
        elif t == "line":
            groupby = p.get("groupby")
            panels.append(wr.LinePlot(
                title=p["title"], x=history_name(p["x"]), y=[history_name(r) for r in p["y"]],
                groupby=(_metric(groupby, wr) if groupby["section"] == "run" else f"{groupby['key']}.value")
                if groupby else None,
                groupby_aggfunc=p.get("aggregate"), groupby_rangefunc=p.get("range"),
                log_y=p.get("log_y"), max_runs_to_show=100))
        elif t == "parallel_coordinates":
            panels.append(wr.ParallelCoordinatesPlot(
                title=p["title"],
                columns=[FlatConfigColumn(metric=_metric(c, wr), display_name=c["key"]) for c in p["columns"]]))
        else:
            raise ValueError(f"unknown panel type {t!r}")

    filters = []
    for f in spec["filters"]:
        if f["section"] == "run":
            m = ws.Metric({"group": "Group"}.get(f["key"], f["key"]))
        elif f["section"] == "config":
            m = ws.Config(f["key"])  # a filter names the (flat) top-level config key itself
        else:
            m = ws.Summary(f["key"])
        if f["op"] != "=":
            raise ValueError(f"unsupported filter op {f['op']!r}")
        filters.append(m == f["value"])
    columns = [_flat_config(c) if c["section"] == "config" else f"{c['section']}:{c['key']}"
               for c in spec["columns"]]
    return ws.Workspace(
        entity=spec["entity"] or "", project=spec["project"], name=spec["name"],
        sections=[ws.Section(name=spec["sections"][0]["name"], panels=panels, is_open=True,
                             layout_settings=ws.SectionLayoutSettings(columns=2, rows=3))],
        runset_settings=ws.RunsetSettings(filters=filters, pinned_columns=columns),
    )


def wire_view(spec: dict) -> dict:
    """What `--publish` saves: the workspace's view as W&B's JSON (camelCase, as the server stores it)."""
    return to_workspace(spec)._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)


def _dashboard_document(spec: dict) -> dict:
    doc = dict(spec)
    try:
        doc["wandb_view"] = wire_view(spec)
    except ImportError:
        doc["wandb_view"] = None
        doc["wandb_view_note"] = "install wandb-workspaces to build the W&B view (pip install wandb-workspaces)"
    return doc


class DashboardError(Exception):
    """A publish failure with a message for the user (no traceback)."""


def publish(spec: dict) -> str:
    """Saves the spec's workspace to W&B; returns its URL. Raises DashboardError with a clear message."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise DashboardError(f"W&B is {mode} here (WANDB_MODE={mode}): nothing can be published. "
                             "Run without --publish to print or --out the spec, or unset WANDB_MODE and `wandb login`.")
    try:
        _wandb_workspaces()
    except ImportError:
        raise DashboardError("--publish needs the wandb-workspaces package: pip install wandb-workspaces") from None
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    import wandb

    try:
        api = wandb.Api(timeout=30)
        entity = spec["entity"] or api.default_entity
    except Exception as e:  # no API key, or the server cannot be reached
        raise DashboardError(f"cannot reach W&B as a logged-in user ({type(e).__name__}: {e}); "
                             "log in with `wandb login` (online), or run without --publish") from None
    if not entity:
        raise DashboardError("no W&B entity: pass --entity")
    try:
        w = to_workspace({**spec, "entity": entity}).save()
        return w.url
    except Exception as e:
        raise DashboardError(f"saving the workspace to W&B failed ({type(e).__name__}: {e})") from None


def dashboard_main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="report.py dashboard",
        description="Writes the W&B workspace of a LoRA sweep (BLEU vs rank per alpha, BLEU vs trainable share, "
                    "val loss by sweep, parallel coordinates). Without --publish: prints the spec as JSON "
                    "(or writes it to --out); no network.")
    ap.add_argument("--project", required=True, help="W&B project (wandb.project; lora3 by default in the app)")
    ap.add_argument("--entity", help="W&B entity (user or team); --publish defaults to the API key's")
    ap.add_argument("--sweep-group", help="only runs of this W&B group (wandb.group, or a multirun's "
                                          "<parent>_<sweep dir>, e.g. rank_alpha)")
    ap.add_argument("--name", help="the workspace's name (default: 'lora3 LoRA sweep [group]')")
    ap.add_argument("--out", help="write the spec here (JSON, atomically) instead of printing it")
    ap.add_argument("--publish", action="store_true", help="save the workspace to W&B (online, logged in)")
    args = ap.parse_args(argv)

    spec = dashboard_spec(args.project, args.entity, args.sweep_group, name=args.name)
    if args.publish:
        try:
            url = publish(spec)
        except DashboardError as e:
            print(f"report.py dashboard: {e}", file=sys.stderr)
            return 1
        print(f"report.py dashboard: saved {spec['name']!r} -> {url}")
        return 0
    text = json.dumps(_dashboard_document(spec), indent=1) + "\n"
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(f"report.py dashboard: {len(spec['sections'][0]['panels'])} panels -> {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `dashboard` is a subcommand, unless a directory of that name is given (the report of it, as before)
    if argv and argv[0] == "dashboard" and not Path("dashboard").is_dir():
        return dashboard_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="W&B dashboard of a sweep (workspace as code): report.py dashboard --help")
    ap.add_argument("sources", nargs="+", help="sweep/run directories, or wandb:<entity>/<project> (W&B API)")
    ap.add_argument("--out", help="where report.md and the plots go (default: the first directory)")
    ap.add_argument("--wandb-files", action="store_true",
                    help="read each run from its offline W&B files instead of metrics.json")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    rows, dirs = [], []
    for s in args.sources:
        if s.startswith("wandb:") or (not Path(s).exists() and s.count("/") == 1):
            rows += collect_wandb_api(s.removeprefix("wandb:"))
        elif Path(s).is_dir():
            dirs.append(Path(s))
        else:
            print(f"report.py: {s}: no such directory (for a W&B project write wandb:<entity>/<project>)",
                  file=sys.stderr)
            return 2
    if dirs:
        rows += collect_dirs(dirs, wandb_files=args.wandb_files)
    if not rows:
        print(f"report.py: no runs found under {', '.join(args.sources)}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (dirs[0] if dirs else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    aggs = aggregate(rows)
    write_markdown(rows, aggs, out / "report.md", args.sources)
    write_csv(rows, out / "runs.csv")
    (out / "runs.json").write_text(json.dumps(rows, indent=1, default=str))
    if not args.no_plots:
        plot(rows, aggs, out)
    n_failed = sum(r["status"] != "finished" for r in rows)
    print(f"report.py: {len(rows)} runs ({n_failed} failed) -> {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
