"""Evaluation: teacher-forced loss and token accuracy, and greedy translations scored with sacrebleu.

    scores = evaluate(bundle, data, arrays, cfg_eval, src_len, tgt_len)
    scores["val/bleu"], scores["val/chrf"], scores["val/loss"], scores["val/accuracy"], scores["samples"]

The BLEU/chrF subset is fixed (the first `eval.num_samples` validation pairs) so that numbers
are comparable across steps, runs and backends. Decoding is greedy (the model is compiled
with `sampler="greedy"`).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
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
