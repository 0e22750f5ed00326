"""The trained base of the default run: a small T5 trained once on a source task, cached.

No pretrained weights can be downloaded here, so lora3 makes its own base and says so. A model
config with a `base:` block (conf/model/t5_tiny.yaml) is not used at random initialisation: it is
first fully trained on the *source* task that block names (by default the synthetic generator's
`variant=base`: present-tense main clauses over half of the lexicon), saved as a keras-hub preset,
and cached. The app then loads that preset and adapts it with LoRA to the *target* task of the
run's `data:` (by default `variant=shift`: perfect tense, negation and subordinate clauses over
the whole lexicon), which the base never saw.

    path, info = ensure_base(model_cfg, cache_dir)      # builds once, then returns the cached preset
    python -m lora3.run.pretrain                            # build (or show) the default base
    python -m lora3.run.pretrain model.base.steps=200       # ... with any override of the app's config

Cache: `<cache_dir>/bases/<model name>-<key>/`, where the key hashes the model architecture,
the `base:` block, the synthetic generator's `GENERATOR_VERSION` and `PRETRAIN_VERSION`; changing
any of them builds a new base. The backend is not in the key: a preset written on JAX loads on
TensorFlow and vice versa. Two jobs that need the same base at once (a sweep) do not both build
it: a file lock serialises them and the base is written into a temporary directory that is
renamed into place, so a directory that exists is complete.

The build runs in a fresh `python -m lora3.run.pretrain --build` process on the caller's backend, so
that its seeds, compiled functions and tokenizer never touch the job that asked for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from lora3.errors import Lora3Error
from lora3.fileio import atomic_write_text, staged_dir
from lora3.run import backend as lb
from lora3.run import evaluate as ev
from lora3.run import tracking
from lora3.run import train as tr
from lora3.run.cache import default_cache_dir
from lora3.run.data import PREFIXES, load, synthetic
from lora3.run.locking import exclusive
from lora3.run.schema import AppConfigError, BaseConfig, compose, validate

PRETRAIN_VERSION = 1
INFO_FILE = "base_info.json"

# What a `base:` block may hold, with its defaults: the schema's `model.base` node.
BASE_DEFAULTS = BaseConfig().model_dump()


class PretrainError(Lora3Error):
    """The base cannot be built or its cache entry is unusable."""


# ---------------------------------------------------------------- spec and cache key


def base_spec(model_cfg: Mapping[str, Any]) -> dict:
    """Everything that decides the base's weights: architecture, init, source task, training."""
    base = model_cfg.get("base")
    if not base:
        raise PretrainError(f"model {model_cfg.get('name')!r} has no `base:` block")
    try:
        validate({"model": {**dict(model_cfg), "base": dict(base)}})
    except AppConfigError as e:
        raise PretrainError(str(e)) from None
    spec = {**BASE_DEFAULTS, **{k: v for k, v in dict(base).items() if v is not None}}
    spec = {k: v for k, v in spec.items() if v is not None}  # unset options leave the cache key as it was
    if model_cfg.get("preset"):
        raise PretrainError("model.base needs a model built from model.config (model.preset is set)")
    return {
        "model": {"name": model_cfg.get("name"), "family": model_cfg.get("family") or "t5",
                  "config": dict(model_cfg.get("config") or {}),
                  "embedding_init_stddev": model_cfg.get("embedding_init_stddev")},
        "base": spec,
    }


def cache_key(spec: Mapping[str, Any]) -> str:
    payload = json.dumps({"spec": spec, "generator_version": synthetic.GENERATOR_VERSION,
                          "pretrain_version": PRETRAIN_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def base_dir(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    spec = base_spec(model_cfg)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "bases" / f"{spec['model']['name'] or 'model'}-{cache_key(spec)}"


def read_info(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def source_name(b: Mapping[str, Any]) -> str:
    if b.get("data"):
        return f"{b['data'].get('name') or b['data'].get('source')} {b['direction']}"
    return f"synthetic/{b['variant']}"


def summary(info: Mapping[str, Any], path: Path | str) -> dict:
    """The part of base_info.json a run records (metrics.json `model.base`)."""
    task = dict(info.get("source_task") or {})
    task.setdefault("name", f"synthetic/{task.get('variant')}")
    return {"path": str(path), "key": info.get("key"), "source_task": task,
            "source_val": {k: v for k, v in (info.get("source_val") or {}).items() if k != "signatures"},
            "steps": (info.get("spec") or {}).get("base", {}).get("steps"),
            "build_seconds": info.get("build_seconds"), "built_on": info.get("backend")}


def ensure_base(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None = None, *,
                backend: str | None = None) -> tuple[Path, dict]:
    """Returns (preset directory, base info) of the trained base, building it first if needed.

    The build runs in a child process on `backend` (default: this process's keras backend, else
    KERAS_BACKEND, else jax) and prints a Keras progress bar.
    """
    target = base_dir(model_cfg, cache_dir)
    info = read_info(target)
    if info is not None:
        return target, info
    spec = base_spec(model_cfg)
    with exclusive(target.with_name(target.name + ".lock"), wait=True,
                   waiting_message=f"[lora3] waiting for another process that is building {target.name} ..."):
        info = read_info(target)  # another process may have built it while we waited
        if info is not None:
            return target, info
        if backend is None:
            backend = lb.imported_backend() or os.environ.get("KERAS_BACKEND") or "jax"
        print(f"[lora3] building the base model once (cached in {target}): {spec['model']['name']} trained "
              f"{spec['base']['steps']} steps on {source_name(spec['base'])} ...", flush=True)
        returncode = _run_build(spec, target, backend)
        info = read_info(target)
        if returncode != 0 or info is None:
            raise PretrainError(f"building the base model failed (exit status {returncode}); see the output above")
    return target, info


def _run_build(spec: Mapping[str, Any], target: Path, backend: str) -> int:
    """Runs `build(spec, target)` in a fresh process on `backend`; returns its exit status."""
    spec_file = target.parent / f".{target.name}.spec-{os.getpid()}.json"
    spec_file.write_text(json.dumps({"spec": spec, "target": str(target)}))
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return subprocess.run([sys.executable, "-m", "lora3.run.pretrain", "--build", str(spec_file)], env=env).returncode
    finally:
        spec_file.unlink(missing_ok=True)


# ---------------------------------------------------------------- the build (child process)


DENOISE_PREFIX = {"en": "denoise English: ", "de": "denoise German: "}


def denoising_pairs(b: Mapping[str, Any], pairs: list[dict] | None = None) -> tuple[list[str], list[str]]:
    """Monolingual pre-training pairs, T5-style: a sentence with `mono_noise` of its words dropped ->
    the sentence, for English and German sentences of the `mono_variant` text (`mono_size` each).

    The base thereby learns to read and to write the whole language (every word and construction
    of both sides), but it never sees a *translation* outside its source task.
    """
    if not b.get("mono_size"):
        return [], []
    if pairs is None:
        pairs, _ = synthetic.generate(b["mono_size"], 1, seed=b["seed"] + 2, variant=b["mono_variant"])
    rng = random.Random(f"lora3-denoise-{b['seed']}")
    inputs, targets = [], []
    for p in pairs:
        for lang in ("en", "de"):
            words = p[lang].split()
            kept = [w for w in words if rng.random() >= b["mono_noise"]] or words[:1]
            inputs.append(DENOISE_PREFIX[lang] + " ".join(kept))
            targets.append(p[lang])
    return inputs, targets


def build(spec: Mapping[str, Any], target: Path) -> dict:
    """Trains the base described by `spec` and writes it (preset + base_info.json) to `target` atomically."""
    t0, cpu0 = time.perf_counter(), time.process_time()

    b = spec["base"]
    if b.get("data"):  # a source task from files (e.g. Multi30K): its first train_size / valid_size pairs
        data = load({**b["data"], "direction": b["direction"], "max_train": b["train_size"],
                     "max_valid": b["valid_size"]}, seed=b["seed"])
        other = "de" if data.tgt_lang == "en" else "en"
        tok_texts = data.tokenizer_texts() + [p[other] for p in data.train] + list(PREFIXES.values())
        mono_in, mono_out = denoising_pairs(b, data.train[: b["mono_size"]])
    else:
        data = load({"source": "synthetic", "variant": b["variant"], "direction": b["direction"],
                     "train_size": b["train_size"], "valid_size": b["valid_size"]}, seed=b["seed"])
        tok_data = load({"source": "synthetic", "variant": b["tokenizer_variant"], "direction": b["direction"],
                         "train_size": b["tokenizer_size"], "valid_size": 1}, seed=b["seed"] + 1)
        tok_texts = tok_data.tokenizer_texts() + data.tokenizer_texts()
        mono_in, mono_out = denoising_pairs(b)
    keras = lb.select(os.environ.get("KERAS_BACKEND", "jax"))
    keras.utils.set_random_seed(b["seed"])

    from lora3.run import models  # after the backend: models builds keras-hub models

    with staged_dir(target) as scratch:
        scratch = Path(scratch)
        bundle = models.build({**spec["model"], "preset": None}, tok_texts + mono_in[:len(mono_in) // 4],
                              seed=b["seed"], cache_dir=scratch / "tok")
        trainer = {"lr": b["lr"], "warmup_steps": b["warmup_steps"], "schedule": "cosine",
                   "min_lr_ratio": b["min_lr_ratio"], "weight_decay": b["weight_decay"],
                   "grad_clip": b["grad_clip"], "jit_compile": True, "batch_size": b["batch_size"],
                   "keep_checkpoints": 1}
        tr.compile_model(bundle, trainer, b["steps"])
        src_len, tgt_len = b["max_source_length"], b["max_target_length"]
        *arrays, _ = bundle.encode(data.inputs("train") + mono_in, data.targets("train") + mono_out,
                                   src_len, tgt_len)
        *varrays, _ = bundle.encode(data.inputs("valid"), data.targets("valid"), src_len, tgt_len,
                                    what="validation")

        def source_loss(step):  # the loss curve: source-task validation loss every eval_every steps
            val = ev.loss_and_accuracy(bundle.model, *varrays, batch_size=64)
            return {"val/loss": val["loss"], "val/accuracy": val["accuracy"]}

        try:  # the run's own training loop (checkpoints go to the scratch directory, removed below)
            result = tr.train(bundle, tuple(arrays), trainer=trainer, max_steps=b["steps"],
                              eval_every=min(b["eval_every"], b["steps"]), seed=b["seed"], out_dir=scratch,
                              evaluate_fn=source_loss, tracker=tracking.Tracker())
        except tr.TrainingError as e:
            raise PretrainError(f"{e}; lower model.base.lr") from None
        curve = [{k: r.get(k) for k in ("step", "train/loss", "val/loss", "val/accuracy")} for r in result["history"]]
        k = min(b["eval_samples"], len(data.valid))
        scores = ev.evaluate(bundle, sources=data.sources("valid")[:k], inputs=data.inputs("valid")[:k],
                             references=data.targets("valid")[:k], arrays=None, batch_size=32,
                             src_len=src_len, max_length=tgt_len)
        print(f"[lora3] base on its source task ({source_name(b)}, {k} held-out pairs): "
              f"BLEU {scores['val/bleu']:.2f}, chrF {scores['val/chrf']:.2f}", flush=True)
        bundle.save_to_preset(scratch)
        shutil.rmtree(scratch / "tok", ignore_errors=True)
        shutil.rmtree(scratch / "checkpoints", ignore_errors=True)
        info = {
            "spec": spec, "key": cache_key(spec), "generator_version": synthetic.GENERATOR_VERSION,
            "pretrain_version": PRETRAIN_VERSION, "backend": keras.backend.backend(),
            "versions": lb.versions(), "params": int(bundle.model.count_params()),
            "source_task": {"name": source_name(b), "variant": None if b.get("data") else b["variant"],
                            "direction": b["direction"], "n_train": len(data.train),
                            "n_valid": len(data.valid), "fingerprint": data.info["fingerprint"],
                            "denoising_pairs": len(mono_in), "mono_variant": b["mono_variant"]},
            "curve": curve,
            "source_val": {"bleu": scores["val/bleu"], "chrf": scores["val/chrf"],
                           "loss": curve[-1]["val/loss"], "accuracy": curve[-1]["val/accuracy"],
                           "num_samples": k, "signatures": scores.get("signatures", {})},
            "samples": scores.get("samples", [])[:5],
            "fit_seconds": result["perf"]["train_seconds"], "build_seconds": time.perf_counter() - t0,
            "build_cpu_seconds": time.process_time() - cpu0,  # user+sys of every thread: load-independent
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(scratch / INFO_FILE, json.dumps(info, indent=1, default=str))
    print(f"[lora3] base built in {info['build_seconds']:.1f}s ({info['fit_seconds']:.1f}s training): {target}",
          flush=True)
    return info


# ---------------------------------------------------------------- command line


def _compose(overrides: list[str]) -> dict:
    return validate(compose(overrides))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--build":
        job = json.loads(Path(argv[1]).read_text())
        try:
            build(job["spec"], Path(job["target"]))
        except Lora3Error as e:
            print(f"[lora3] error: {e}", file=sys.stderr)
            return 1
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    plain = _compose(argv)
    try:
        path, info = ensure_base(plain["model"], plain.get("cache_dir"), backend=plain.get("backend"))
    except Lora3Error as e:
        print(f"[lora3] error: {e}", file=sys.stderr)
        return 1
    sv = info["source_val"]
    print(f"[lora3] base {path}\n  source task {info['source_task'].get('name')}: BLEU {sv['bleu']:.2f}, "
          f"chrF {sv['chrf']:.2f}, val loss {sv['loss']:.4f}; built in {info['build_seconds']:.1f}s "
          f"on {info['backend']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
