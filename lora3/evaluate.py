"""Evaluation: teacher-forced loss and token accuracy, and greedy translations scored with sacrebleu.

    scores = evaluate(bundle, data, arrays, cfg_eval, src_len, tgt_len)
    scores["val/bleu"], scores["val/chrf"], scores["val/loss"], scores["val/accuracy"], scores["samples"]

The BLEU/chrF subset is fixed (the first `eval.num_samples` validation pairs) so that numbers
are comparable across steps, runs and backends. Decoding is greedy (the model is compiled
with `sampler="greedy"`).
"""

from __future__ import annotations

import time
from typing import Any

import sacrebleu


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
    """Teacher-forced loss and token accuracy on prepared arrays (masked by sample weights)."""
    preprocessor = model.preprocessor
    model.preprocessor = None  # arrays are already tokenised and packed
    try:
        res = model.evaluate(x=x, y=y, sample_weight=sw, batch_size=batch_size, verbose=0, return_dict=True)
    finally:
        model.preprocessor = preprocessor
    acc = next((v for k, v in res.items() if "accuracy" in k), None)
    return {"loss": float(res["loss"]), "accuracy": None if acc is None else float(acc)}


def evaluate(bundle, *, sources: list[str], inputs: list[str], references: list[str],
             arrays: tuple | None, batch_size: int, src_len: int, max_length: int,
             prefix: str = "val") -> dict[str, Any]:
    """Loss/accuracy on `arrays` (x, y, sw) and BLEU/chrF of greedy translations of `inputs`."""
    out: dict[str, Any] = {}
    if arrays is not None:
        la = loss_and_accuracy(bundle.model, *arrays, batch_size=batch_size)
        out[f"{prefix}/loss"] = la["loss"]
        if la["accuracy"] is not None:
            out[f"{prefix}/accuracy"] = la["accuracy"]
    if inputs:
        t0 = time.perf_counter()
        hyps = bundle.generate(inputs, max_length=max_length, batch_size=batch_size, src_len=src_len)
        out[f"{prefix}/generate_s"] = time.perf_counter() - t0
        scores = score_translations(hyps, references)
        out[f"{prefix}/bleu"] = scores["bleu"]
        out[f"{prefix}/chrf"] = scores["chrf"]
        out["signatures"] = {"bleu": scores["bleu_signature"], "chrf": scores["chrf_signature"]}
        out["samples"] = [
            {"source": s, "reference": r, "hypothesis": h} for s, r, h in zip(sources, references, hyps)
        ]
    return out
