"""Side-by-side table and loss curves of the JAX and TensorFlow runs: parity.md, parity.png."""

import json
import sys
from pathlib import Path

here = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
runs = {b: json.loads((here / "runs" / b / "metrics.json").read_text()) for b in ("jax", "tensorflow")}
cross = {p.stem: json.loads(p.read_text()) for p in sorted(here.glob("cross_*.json"))}

lines = ["| | JAX | TensorFlow |", "|---|---:|---:|"]


def row(name, f, digits=2):
    vals = [f(runs[b]) for b in ("jax", "tensorflow")]
    lines.append(f"| {name} | " + " | ".join("" if v is None else f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"
                                            for v in vals) + " |")


row("trainable params", lambda m: m["params"]["trainable"])
row("trainable %", lambda m: m["params"]["trainable_percent"], 3)
row("frozen base: val loss", lambda m: m["before"]["val/loss"], 4)
row("frozen base: val BLEU", lambda m: m["before"]["val/bleu"])
for h in runs["jax"]["history"]:
    s = h["step"]
    row(f"step {s}: train loss", lambda m: next(x["train/loss"] for x in m["history"] if x["step"] == s), 4)
    row(f"step {s}: val loss", lambda m: next(x["val/loss"] for x in m["history"] if x["step"] == s), 4)
    row(f"step {s}: val BLEU", lambda m: next(x["val/bleu"] for x in m["history"] if x["step"] == s))
row("final val chrF", lambda m: m["final"]["val/chrf"])
row("tokens/s", lambda m: m["perf"].get("tokens_per_s"), 0)
row("wall s", lambda m: m["perf"]["wall_seconds"], 1)
ja, tf = ([json.loads(l)["hypothesis"] for l in (here / "runs" / b / "samples.jsonl").read_text().splitlines()]
          for b in ("jax", "tensorflow"))
lines += ["", f"Identical final greedy translations JAX vs TensorFlow: {sum(a == b for a, b in zip(ja, tf))} of {len(ja)}.", ""]
if cross:
    lines += ["| adapter trained on | evaluated on | val loss | BLEU | chrF | its own run's val loss / BLEU | identical translations |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for c in cross.values():
        lines.append(f"| {c['adapter_from']} | {c['evaluated_on']} | {c['val/loss']:.4f} | {c['val/bleu']:.2f} | "
                     f"{c['val/chrf']:.2f} | {c['own_final']['val/loss']:.4f} / {c['own_final']['val/bleu']:.2f} | "
                     f"{c['identical_translations']} of {c['num_samples']} |")
(here / "parity.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for b, style in (("jax", "-o"), ("tensorflow", "--s")):
    m = runs[b]
    steps = [0] + [h["step"] for h in m["history"]]
    axes[0].plot(steps, [m["before"]["val/loss"]] + [h["val/loss"] for h in m["history"]], style, label=f"{b} val")
    axes[0].plot([h["step"] for h in m["history"]], [h["train/loss"] for h in m["history"]], style, alpha=0.5,
                 label=f"{b} train (period mean)")
    axes[1].plot(steps, [m["before"]["val/bleu"]] + [h["val/bleu"] for h in m["history"]], style, label=b)
axes[0].set_xlabel("step"); axes[0].set_ylabel("loss"); axes[0].legend(); axes[0].grid(alpha=0.3)
axes[1].set_xlabel("step"); axes[1].set_ylabel("val BLEU"); axes[1].legend(); axes[1].grid(alpha=0.3)
fig.suptitle("Default run (LoRA qv r=8 on the trained base), seed 0: JAX vs TensorFlow")
fig.tight_layout()
fig.savefig(here / "parity.png", dpi=110)
