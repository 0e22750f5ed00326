"""Evaluates the adapter of one backend's run on this process's backend (KERAS_BACKEND).

    KERAS_BACKEND=tensorflow python experiments/backend_parity/cross_eval.py runs/jax --out cross_jax_on_tf.json

Builds the run's model exactly as the run did (same config.yaml: the cached base), loads the
run's `adapter/` with `lora3.load_adapter`, and scores the same validation subset (val loss,
BLEU, chrF). It also compares the greedy translations with the run's own `samples.jsonl`.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run = Path(args.run_dir)
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    backend_name = os.environ.get("KERAS_BACKEND", "jax")
    from lora3.run import backend as lb
    from lora3.run import data as data_mod

    data = data_mod.load(plain["data"], seed=plain["seed"])
    keras = lb.select(backend_name)
    keras.utils.set_random_seed(plain["seed"])
    import lora3
    from lora3.run import evaluate as ev
    from lora3.run import models, train as tr

    t0 = time.perf_counter()
    bundle = models.build(plain["model"], data.tokenizer_texts(), seed=plain["seed"], cache_dir=plain.get("cache_dir"))
    lora3.load_adapter(bundle.model, run / "adapter", trainable=False)
    tr.compile_model(bundle, plain["trainer"], 1)
    src_len, tgt_len = plain["data"]["max_source_length"], plain["data"]["max_target_length"]
    e = plain["eval"]
    n_loss = e.get("loss_samples") or len(data.valid)
    *val, _ = bundle.encode(data.inputs("valid")[:n_loss], data.targets("valid")[:n_loss], src_len, tgt_len,
                            what="validation")
    k = min(e["num_samples"], len(data.valid))
    scores = ev.evaluate(bundle, sources=data.sources("valid")[:k], inputs=data.inputs("valid")[:k],
                         references=data.targets("valid")[:k], arrays=tuple(val), batch_size=e["batch_size"],
                         src_len=src_len, max_length=e.get("max_length") or tgt_len)
    own = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    same = sum(a["hypothesis"] == b["hypothesis"] for a, b in zip(own, scores["samples"]))
    metrics = json.loads((run / "metrics.json").read_text())
    out = {
        "adapter_from": metrics["backend"], "evaluated_on": keras.backend.backend(),
        "run_dir": str(run), "val/loss": scores["val/loss"], "val/bleu": scores["val/bleu"],
        "val/chrf": scores["val/chrf"], "own_final": {k: metrics["final"].get(k) for k in ("val/loss", "val/bleu", "val/chrf")},
        "identical_translations": same, "num_samples": k, "seconds": time.perf_counter() - t0,
        "differing_examples": [{"source": a["source"], "own": a["hypothesis"], "cross": b["hypothesis"]}
                               for a, b in zip(own, scores["samples"]) if a["hypothesis"] != b["hypothesis"]][:5],
    }
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in out.items() if k != "differing_examples"}, indent=1))


if __name__ == "__main__":
    main()
