"""One job of the app, top to bottom: `run_job(cfg, output_dir)`.

    validate config -> claim the run directory -> check reachability -> load data -> choose the
    backend (keras imported here) -> W&B run -> build the model -> LoRA / full / frozen -> compile
    -> encode val/test -> evaluate before -> train (eval + checkpoint every eval.every steps)
    -> adapter/, samples.jsonl, metrics.json, W&B summary

Every step is one call into the module that owns it. Errors in the config or inputs stop the job
before any work, with a message naming the key and what is valid; then nothing the job created
stays but its log (`rundir.claim`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import lora3
from lora3.errors import Lora3Error
from lora3.run import data as data_mod
from lora3.run import distribution as dist_mod
from lora3.run import evaluate as ev
from lora3.run import finetune, models, outputs, remat, rundir, schema, tracking
from lora3.run import backend as backend_mod

log = logging.getLogger("lora3")


class OfflineError(Lora3Error):
    """The model preset or the dataset cannot be reached from here (no network, not cached)."""


def run_job(cfg, output_dir: str | os.PathLike, *, job: Mapping[str, Any] | None = None,
            callbacks: tuple = ()) -> dict:
    """Runs one experiment in this process and returns its metrics (also written to metrics.json).

    Args:
        cfg: a composed config (Hydra `DictConfig` or a plain dict).
        output_dir: the run directory.
        job: Hydra's view of the job (choices, overrides, multirun, sweep dir), when there is one.
        callbacks: extra Keras callbacks for `fit`.

    Raises:
        Lora3Error: bad config or inputs (before any work), or a failed run. The W&B run is finished
        either way.
    """
    t_start = time.perf_counter()
    job = dict(job or {})
    plain = schema.validate(cfg)                                        # 1. config
    out = dist_mod.output_dir(Path(output_dir).resolve(), plain)        # process 0 writes; others scratch
    rundir.check_output_dir(out, plain["resume"])
    if plain["resume"] and (out / "metrics.json").is_file():
        log.info("resume=true: %s already finished; nothing to do", out)
        return json.loads((out / "metrics.json").read_text())
    with rundir.claim(out):                                             # one process per run directory
        preflight(plain, job)                                           # offline: fail now, say what works
        data = data_mod.load(plain["data"], seed=plain["seed"])         # 2. data (no keras needed)
        derive_length(plain, len(data.train))
        keras = backend_mod.start(plain)                                # 3. backend, seed, precision, mesh
        outputs.write_config(out, plain)
        with tracking.run_for(plain, data, out, job) as tracker:        # 4. W&B
            model_cfg, origin = finetune.model_source(plain)             # 5. model: GGUF | trained base | preset
            bundle = models.build(model_cfg, data.tokenizer_texts(), seed=plain["seed"],
                                  cache_dir=plain.get("cache_dir"), info=origin)
            if plain["trainer"]["remat"] in remat.RECOMPUTE_BLOCKS:       # recompute each block in the backward pass
                log.info("trainer.remat=%s: %d transformer blocks recomputed in the backward pass",
                         plain["trainer"]["remat"], len(remat.remat_blocks(bundle.model)))
            if plain["trainer"]["fused_attention"]:                      # T5 attention as one fused op
                log.info("trainer.fused_attention=true: %d attention layers fused",
                         len(lora3.fuse_attention(bundle.model)))
            params = finetune.prepare(bundle, plain, out)               # 6. LoRA surgery | full | frozen
            train_arrays, tokens_per_step = finetune.compile_and_encode(bundle, plain, data)
            splits = ev.prepare_splits(bundle, data, plain)             # 7. val (and test) arrays, BLEU subsets
            outputs.announce(plain, keras, params, data, tracker)
            before = ev.before_training(bundle, splits, plain, out, tracker)        # 8. evaluate before
            result = finetune.train(bundle, train_arrays, ev.validation_fn(bundle, splits, plain),  # 9. train
                                    plain, out, tracker, callbacks=callbacks, tokens_per_step=tokens_per_step)
            final = ev.after_training(bundle, splits, plain, result, before)
            saved = finetune.save(bundle.model, plain, out, tokenizer=bundle.tokenizer)             # 10. adapter or full model
            return outputs.finish(plain, out, job, keras, bundle, data, params, before, final,
                                  result, saved, tracker, t_start)


def preflight(plain: Mapping[str, Any], job: Mapping[str, Any] | None = None) -> None:
    """Fails at once, before any heavy work, when the preset or the dataset cannot be reached;
    the message names both and the overrides that run the same recipe on local things. Adapter
    directories the config names (`lora.init_from`, `eval.adapter`) must exist."""
    finetune.check_adapter_dirs(plain)
    model_cfg = plain.get("model") or {}
    missing = {"model": models.unreachable(model_cfg), "data": data_mod.unreachable(plain.get("data") or {})}
    if not any(missing.values()):
        return
    if missing["model"] and model_cfg.get("gguf") and not model_cfg.get("preset"):
        raise OfflineError(f"cannot load {missing['model']}")
    fixes = []
    if missing["model"]:
        fixes.append("model.preset=<dir> (a local keras-hub preset directory, as written by "
                     "`model.save_to_preset(dir)` on a machine that can download it)")
    if missing["data"]:
        fixes.append("data=multi30k (a local copy of Multi30K de-en with data.path=<dir>; downloaded from the "
                     "official files when online) or data=jsonl data.path=<file.jsonl> (HF translation schema)")
    keep = [o for o in (job or {}).get("overrides", [])
            if not o.lstrip("+~").startswith(("model.preset=", "data=", "data.path=", "hydra."))]
    example = " ".join(["python -m lora3.run", *keep,
                        *(["model.preset=/path/to/preset"] if missing["model"] else []),
                        *(["data=multi30k"] if missing["data"] else [])])
    raise OfflineError(
        "cannot reach " + " and ".join(m for m in missing.values() if m) + " (offline?). "
        "Run the same recipe on local things with " + "; and ".join(fixes) + f". For example: {example}"
    )


def derive_length(plain: dict, n_train: int) -> None:
    """trainer.epochs -> trainer.max_steps = ceil(epochs * n_train / batch_size), capped by a
    trainer.max_steps given too; eval.every null -> once per epoch (or once, at the end)."""
    trainer, ev_cfg = plain["trainer"], plain["eval"]
    steps_per_epoch = math.ceil(n_train / trainer["batch_size"])
    if trainer.get("epochs"):
        derived = math.ceil(trainer["epochs"] * n_train / trainer["batch_size"])
        cap = trainer.get("max_steps")
        trainer["max_steps"] = min(derived, cap) if cap else derived
        trainer["steps_per_epoch"] = steps_per_epoch
    if ev_cfg.get("every") is None:
        ev_cfg["every"] = steps_per_epoch if trainer.get("epochs") else trainer["max_steps"]
