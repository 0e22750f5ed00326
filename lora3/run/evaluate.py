"""Evaluation: teacher-forced loss and token accuracy, and greedy translations scored with sacrebleu.

    splits = prepare_splits(bundle, data, plain)        # validation (and test): encoded once
    scores = evaluate_split(bundle, splits[0], plain)   # val/loss, val/perplexity, val/accuracy, val/bleu,
                                                        # val/chrf, samples

The BLEU/chrF subset is fixed (the first `eval.num_samples` validation pairs) so that numbers
are comparable across steps, runs and backends. Decoding is greedy (the model is compiled
with `sampler="greedy"`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import sacrebleu

from lora3.fileio import atomic_write_text
from lora3.run import distribution as dist_mod
from lora3.run import train as tr


def score_translations(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults) with their signatures."""
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": float(b.score),
        "chrf": float(c.score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def loss_and_accuracy(model, x, y, sw, batch_size: int) -> dict:
    """Teacher-forced mean cross-entropy per weighted token, its perplexity, and token accuracy.

    The loss is the compiled `token_loss` metric (`lora3.run.train.compile_model`): a weighted
    cross-entropy that Keras accumulates as sum(weight * ce) / sum(weight) over every batch (and
    every process of a distributed run), so it is the mean over every token the loss uses,
    whatever the padding or the batch split.
    """
    preprocessor = getattr(model, "preprocessor", None)
    if preprocessor is not None:
        model.preprocessor = None  # arrays are already tokenised and packed
    try:
        res = model.evaluate(x=x, y=y, sample_weight=sw, batch_size=batch_size, verbose=0, return_dict=True)
    finally:
        if preprocessor is not None:
            model.preprocessor = preprocessor
    loss = float(res.get("token_loss", res["loss"]))
    acc = next((v for k, v in res.items() if "accuracy" in k), None)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(np.sum(sw)),
            "accuracy": None if acc is None else float(acc)}


def evaluate(bundle, *, sources: list[str], inputs: list[str], references: list[str],
             arrays: tuple | None, batch_size: int, src_len: int, max_length: int,
             prefix: str = "val") -> dict[str, Any]:
    """Loss/perplexity/accuracy on `arrays` (x, y, sw) and BLEU/chrF of greedy translations of `inputs`
    (`sources` fill a decoder-only model's `{source}` prompt slot)."""
    out: dict[str, Any] = {}
    if arrays is not None:
        la = loss_and_accuracy(bundle.fit_model, *arrays, batch_size=batch_size)
        out[f"{prefix}/loss"] = la["loss"]
        out[f"{prefix}/perplexity"] = la["perplexity"]
        if la["accuracy"] is not None:
            out[f"{prefix}/accuracy"] = la["accuracy"]
    if inputs:
        t0 = time.perf_counter()
        hyps = bundle.generate(inputs, max_length=max_length, batch_size=batch_size, src_len=src_len,
                               sources=sources)
        out[f"{prefix}/generate_s"] = time.perf_counter() - t0
        out[f"{prefix}/sentences_per_s"] = len(hyps) / max(out[f"{prefix}/generate_s"], 1e-9)
        scores = score_translations(hyps, references)
        out[f"{prefix}/bleu"] = scores["bleu"]
        out[f"{prefix}/chrf"] = scores["chrf"]
        out["signatures"] = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
        out["samples"] = [
            {"source": s, "reference": r, "hypothesis": h} for s, r, h in zip(sources, references, hyps)
        ]
    return out


# ---------------------------------------------------------------- splits: validation and test, one path


@dataclasses.dataclass
class Split:
    """One evaluation split, encoded once: teacher-forced arrays for the loss, and the fixed subset
    (the first `eval.num_samples` pairs) translated greedily for BLEU/chrF."""

    prefix: str                # "val" | "test": the metric names' prefix
    arrays: tuple | None       # (x, y, sample_weight), padded to the data-parallel devices
    batch_size: int
    sources: list[str]
    inputs: list[str]
    references: list[str]


def prepare_split(bundle, data, split: str, prefix: str, plain: Mapping[str, Any]) -> Split:
    """Encodes `data`'s `split` ("valid" or "test") for evaluation under the run's limits."""
    d, ev_cfg = plain["data"], plain["eval"]
    pairs = data.valid if split == "valid" else data.test
    n_loss = ev_cfg.get("loss_samples") or len(pairs)
    *arrays, _ = bundle.encode(data.inputs(split)[:n_loss], data.targets(split)[:n_loss], d["max_source_length"],
                               d["max_target_length"], overlong="error" if d["overlong"] == "error" else "truncate",
                               what="validation" if split == "valid" else split, sources=data.sources(split)[:n_loss])
    arrays, batch_size = dist_mod.pad_eval(tuple(arrays), ev_cfg["batch_size"])
    n = 0 if dist_mod.current().multi_process else min(ev_cfg["num_samples"], len(pairs))  # generation: 1 process
    return Split(prefix, arrays, batch_size, data.sources(split)[:n], data.inputs(split)[:n], data.targets(split)[:n])


def prepare_splits(bundle, data, plain: Mapping[str, Any]) -> list[Split]:
    """The validation split, and the test split when `data.test_split` gave one (scored before and after
    training, never used to select)."""
    return [prepare_split(bundle, data, "valid", "val", plain),
            *([prepare_split(bundle, data, "test", "test", plain)] if data.test else [])]


def evaluate_split(bundle, split: Split, plain: Mapping[str, Any]) -> dict[str, Any]:
    d = plain["data"]
    return evaluate(bundle, sources=split.sources, inputs=split.inputs, references=split.references,
                    arrays=split.arrays, batch_size=split.batch_size, src_len=d["max_source_length"],
                    max_length=plain["eval"].get("max_length") or d["max_target_length"], prefix=split.prefix)


def evaluate_all(bundle, splits: list[Split], plain: Mapping[str, Any], scores: dict | None = None) -> dict:
    """Scores every split (reusing `scores` already computed for validation); a split's samples go
    under `samples` (validation) or `<prefix>_samples`."""
    out: dict[str, Any] = {}
    for split in splits:
        got = scores if (scores is not None and split.prefix == "val") else evaluate_split(bundle, split, plain)
        out.update({k: v for k, v in got.items() if k.startswith(split.prefix + "/")})
        out["samples" if split.prefix == "val" else f"{split.prefix}_samples"] = got.get("samples", [])
        if got.get("signatures"):
            out["signatures"] = got["signatures"]
    return out


def validation_fn(bundle, splits: list[Split], plain: Mapping[str, Any]):
    """`evaluate_fn(step)` for the training loop: the validation split only."""
    return lambda step: evaluate_split(bundle, splits[0], plain)


def before_training(bundle, splits: list[Split], plain: Mapping[str, Any], out: Path, tracker) -> dict:
    """Scores the model before training (`eval.before`, always for `finetune=none`); a resumed run
    reads them back from `.before.json`."""
    resuming = plain["resume"] and tr.list_checkpoints(out)
    if resuming:
        path = out / ".before.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    if not (plain["eval"]["before"] or plain["finetune"] == "none"):
        return {}
    before = evaluate_all(bundle, splits, plain)
    tracker.log({k: v for k, v in before.items() if k.startswith(("val/", "test/"))}, step=0)
    print(f"[lora3] before training: val/loss={before.get('val/loss', float('nan')):.4f} "
          f"val/bleu={before.get('val/bleu', float('nan')):.2f} val/chrf={before.get('val/chrf', float('nan')):.2f}",
          flush=True)
    atomic_write_text(out / ".before.json", json.dumps({k: v for k, v in before.items() if not k.endswith("samples")}))
    return before


def after_training(bundle, splits: list[Split], plain: Mapping[str, Any], result: dict, before: dict) -> dict:
    """The final scores: the training loop's last evaluation (validation) plus the other splits."""
    if plain["finetune"] == "none":
        return before
    return evaluate_all(bundle, splits, plain, scores=result.get("last_scores"))
