"""The study's table: one row per arm from runs/<arm>/metrics.json, plus sample translations.

    python experiments/gemma3_multi30k/summarize.py        # writes experiments/gemma3_multi30k/results.md

`scripts/report.py` gives the generic sweep report (report.md, runs.csv); this adds what the study
reports per arm: wall time, peak RSS, generation speed, the gain over the frozen model as a share of
full fine-tuning's, and the same validation sentences translated by every arm.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ["frozen", "lora_qv_r8", "lora_all_linear_r1", "lora_all_linear_r8", "lora_all_linear_r32", "full",
        "lora_all_linear_r8_int8", "lora_all_linear_r8_int4"]
SAMPLES = [0, 1, 2, 7, 42]


def main():
    runs = {a: json.loads((HERE / "runs" / a / "metrics.json").read_text())
            for a in ARMS if (HERE / "runs" / a / "metrics.json").is_file()}
    frozen = runs.get("frozen", {}).get("final", {}).get("val/bleu")
    full = runs.get("full", {}).get("final", {}).get("val/bleu")
    lines = ["# Gemma 3 270M on Multi30K de→en: results", "",
             "Validation split, 1,014 sentences, greedy; sacrebleu signatures below. JAX, seed 0, 2-core CPU "
             "shared with other jobs (times are upper bounds). `of full gain` = (BLEU − frozen) / (full − frozen).", "",
             "| arm | trainable | trainable % | BLEU | chrF | val loss / token | perplexity | of full gain | "
             "train s | wall s | peak RSS GB | sentences/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in ARMS:
        if arm not in runs:
            lines.append(f"| {arm} | not run yet | | | | | | | | | | |")
            continue
        m = runs[arm]
        f, p, perf = m["final"], m["params"], m["perf"]
        gain = ""
        if frozen is not None and full is not None and full != frozen and arm not in ("frozen", "full"):
            gain = f"{100 * (f['val/bleu'] - frozen) / (full - frozen):.0f}%"
        lines.append(
            f"| {arm} | {p['trainable']:,} | {p['trainable_percent']:.3f} | {f['val/bleu']:.2f} | {f['val/chrf']:.2f} | "
            f"{f['val/loss']:.4f} | {f.get('val/perplexity', float('nan')):.2f} | {gain} | "
            f"{perf.get('train_seconds') or 0:.0f} | {perf['wall_seconds']:.0f} | "
            f"{perf.get('host_peak_rss_bytes', 0) / 2**30:.1f} | {f.get('val/sentences_per_s', float('nan')):.2f} |")
    any_run = next(iter(runs.values()), None)
    if any_run:
        lines += ["", f"BLEU: `{any_run['signatures'].get('bleu')}`; chrF: `{any_run['signatures'].get('chrf')}`", "",
                  "## The same sentences, every arm", ""]
        samples = {a: [json.loads(x) for x in (HERE / "runs" / a / "samples.jsonl").read_text().splitlines()]
                   for a in runs}
        first = samples[next(iter(samples))]
        for i in SAMPLES:
            if i >= len(first):
                continue
            lines += [f"**{i}.** {first[i]['source']}", f"- reference: {first[i]['reference']}"]
            lines += [f"- {a}: {samples[a][i]['hypothesis']}" for a in samples]
            lines.append("")
    (HERE / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:16]))


if __name__ == "__main__":
    main()
