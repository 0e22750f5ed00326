"""Adapter files: save, load (checked), merge.

An adapter directory holds two files, both plain data:

- `adapter_config.json`: `rank`, `alpha`, `rslora`, `dropout`, `init`,
  `targets`, `layers`, `train_also`, `rank_pattern`, `alpha_pattern` and
  `exclude` (while not empty), `layer_paths`, `base_class`,
  `base_fingerprint`, `lora3_version`, `format_version` and the sha256 of the
  tensor file (so an altered file is refused, not silently loaded).
- `adapter.safetensors`: only LoRA tensors, float32, keyed
  `<layer.path>/lora_A` `(in_features, rank)` and `<layer.path>/lora_B`
  `(rank, out_features)` (and, for a DoRA adapter, whose config has
  `"dora": true`, `<layer.path>/lora_magnitude` `(out_features,)`; for a PiSSA/OLoRA adapter,
  whose config has `"base_residual": true`, the factors it started from,
  `<layer.path>/lora_A_init` and `<layer.path>/lora_B_init`, the update that
  was taken out of each base kernel), with each layer's own rank (`LoraConfig.rank_for`): the matrix view, `delta W = s * A @ B` with W as
  `(in_features, out_features)`. (The `lora_A` variable itself is stored
  `(rank, in_features)` for speed, see `lora3.layers.lora_layer`; it is transposed
  on the way in and out, so the file format is unchanged.) Weights named in `train_also` (if any) go to
  `extra_weights.safetensors`, keyed by variable path.

Nothing backend-specific is written, so an adapter saved under JAX loads under
TensorFlow.

`save_adapter(..., format="peft")` and `load_adapter` also write and read Hugging Face PEFT's
format (`lora3.peft_format`). A file holds one adapter and not its name (as PEFT's): the tensor
keys are the same whatever the adapter is called in the model, so any adapter
of a model can be saved, and loaded under any name (`adapter_name=`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
from keras import ops
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

import lora3
from lora3.config import DEFAULT_ADAPTER, LoraConfig, base_rewriting, check_adapter_name
from lora3.errors import AdapterError, LoraConfigError
from lora3.fileio import read_json_object, sha256_file, staged_dir
from lora3.peft_format import is_peft_adapter, load_peft_adapter, save_peft_adapter
from lora3.report import LoraReport
from lora3.surgery import (
    _train_also_patterns,
    apply_plan,
    backbone_of,
    lora_layers,
    lora_state,
    make_report,
    plan,
    reset_compiled_functions,
    unload,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
EXTRA_NAME = "extra_weights.safetensors"
FORMAT_VERSION = 1
FORMATS = ("lora3", "peft")
# Config keys excluded from the fingerprint: they do not change the architecture.
_VOLATILE_KEYS = ("name", "dtype", "trainable")
_REQUIRED = {
    "rank": int,
    "alpha": (int, float),
    "rslora": bool,
    "dropout": (int, float),
    "targets": (str, list),
    "layer_paths": list,
    "base_class": str,
    "base_fingerprint": str,
    "lora3_version": str,
    "sha256": str,
}
_OPTIONAL = {
    "init": str,
    "layers": (list, type(None)),
    "train_also": list,
    "format_version": int,
    "extra_weights": list,
    "extra_sha256": str,
    "model_class": str,
    "rank_pattern": dict,
    "alpha_pattern": dict,
    "exclude": list,
    "dora": bool,
    "base_residual": bool,
}


def base_fingerprint(model) -> str:
    """A hash of the backbone's architecture config (class and hyper-parameters).

    The auto-numbered name, dtype and trainable flags are left out, so the same
    architecture gives the same fingerprint from a task model or its backbone,
    in any dtype. Adapters record it, and `load_adapter` refuses a base whose
    fingerprint differs.

    Args:
        model: a keras-hub task or backbone, or any keras model.

    Returns:
        16 hex digits, a str.

    Example:
    >>> import keras
    >>> def make():
    ...     return keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(2, name="out")])
    >>> base_fingerprint(make()) == base_fingerprint(make())
    True
    """
    backbone = backbone_of(model)
    config = {k: v for k, v in backbone.get_config().items() if k not in _VOLATILE_KEYS}
    blob = json.dumps({"class": type(backbone).__name__, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]



def save_adapter(model, directory, overwrite=True, adapter_name=None, format="lora3",
                 base_model_name_or_path=None) -> str:
    """Writes one adapter's LoRA weights and settings to `directory`.

    In lora3's format (below), or with `format="peft"` in Hugging Face
    PEFT's (`adapter_config.json` + `adapter_model.safetensors`, for
    keras-hub T5, Gemma and Gemma 3: `lora3.peft_format.save_peft_adapter`).

    The directory is written whole or not at all: files go to a temporary
    directory beside it, which then replaces it (`lora3.fileio.staged_dir`).
    Weights outside LoRA go to `extra_weights.safetensors`: for the active
    adapter every other trainable weight (its `train_also`), for an inactive
    one the weights its `train_also` names.

    Args:
        model: a model with LoRA layers (`apply_lora` or `load_adapter`).
        directory: str or path. The adapter directory to write.
        overwrite: bool. With `False` an existing directory is refused.
        adapter_name: str or None. The adapter to save; `None` for the
            active one.
        format: str. `"lora3"` or `"peft"`.
        base_model_name_or_path: str or None. With `format="peft"`: the
            base model's name written into PEFT's config.

    Returns:
        The absolute path of the directory, a str.

    Raises:
        AdapterError: the model has no LoRA layers or no such adapter, or
            `directory` exists and `overwrite=False`.

    Example:
    >>> import os, tempfile, keras_hub, lora3
    >>> def t5():
    ...     return keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
    ...                                        hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> backbone = t5()
    >>> _ = lora3.apply_lora(backbone, rank=2, targets="qv")
    >>> path = lora3.save_adapter(backbone, os.path.join(tempfile.mkdtemp(), "adapter"))
    >>> sorted(os.listdir(path))
    ['adapter.safetensors', 'adapter_config.json']
    """
    if format not in FORMATS:
        raise AdapterError(f"format={format!r} is not an adapter format; use one of: {', '.join(FORMATS)}")
    if format == "peft":
        return save_peft_adapter(model, directory, base_model_name_or_path=base_model_name_or_path,
                                 overwrite=overwrite, adapter_name=adapter_name)
    wrappers = lora_layers(model)
    if not wrappers:
        raise AdapterError("the model has no LoRA layers to save; call lora3.apply_lora(model, ...) first")
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise AdapterError(f"{directory} already exists; pass overwrite=True or choose another directory")
    state = lora_state(model)
    active = state.active if state else wrappers[0].active_adapter
    name = active if adapter_name is None else adapter_name
    known = list(state.adapters) if state else sorted({n for w in wrappers for n in w.adapter_names})
    if name not in known:
        raise AdapterError(f"the model has no adapter {name!r} (its adapters: {', '.join(known)})")
    wrappers = [w for w in wrappers if name in w.adapter_names]
    first = wrappers[0].get_adapter(name)
    config = state.adapters[name].config if state else LoraConfig(rank=first.rank, alpha=first.alpha)
    config = _config_matching(config, {w.path: w.get_adapter(name) for w in wrappers})
    tensors = {}
    residual = base_rewriting(config.init)
    if residual:
        unknown = [w.path for w in wrappers if w.get_adapter(name).initial_factors is None]
        if unknown:
            raise AdapterError(
                f"adapter {name!r} (init={config.init!r}) left residuals in the base kernels, but the factors it "
                f"started from are unknown on {unknown[0]!r} (a model loaded from a .keras file keeps the "
                "residual, not those): its file could not rebuild the residual on the original base. Merge it "
                "instead (lora3.merge_and_unload) and save the model")
    for w in wrappers:
        adapter = w.get_adapter(name)
        if residual:
            a0, b0 = adapter.initial_factors
            tensors[f"{w.path}/lora_A_init"] = np.ascontiguousarray(np.asarray(a0).T, dtype=np.float32)
            tensors[f"{w.path}/lora_B_init"] = np.ascontiguousarray(b0, dtype=np.float32)
        tensors[f"{w.path}/lora_A"] = np.ascontiguousarray(ops.convert_to_numpy(adapter.lora_A).T, dtype=np.float32)
        tensors[f"{w.path}/lora_B"] = np.ascontiguousarray(ops.convert_to_numpy(adapter.lora_B), dtype=np.float32)
        if adapter.dora:
            tensors[f"{w.path}/lora_magnitude"] = np.ascontiguousarray(
                ops.convert_to_numpy(adapter.lora_magnitude), dtype=np.float32)
    lora_ids = {id(v) for w in lora_layers(model) for n in w.adapter_names for v in w.get_adapter(n).variables()}
    if name == active:
        candidates = [v for v in model.trainable_weights if id(v) not in lora_ids]
    else:
        # An inactive adapter's own weights are frozen: its train_also names them.
        patterns = [p for _, p in _train_also_patterns(config.train_also)]
        candidates = [v for v in model.weights if id(v) not in lora_ids and any(p.search(v.path) for p in patterns)]
    extra = {v.path: np.ascontiguousarray(ops.convert_to_numpy(v), dtype=np.float32) for v in candidates}
    with staged_dir(directory) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "lora3"})
        if extra:
            save_file(extra, os.path.join(tmp, EXTRA_NAME), metadata={"format": "lora3"})
        meta = {
            **config.to_dict(),
            "layer_paths": [w.path for w in wrappers],
            "base_class": type(backbone_of(model)).__name__,
            "model_class": type(model).__name__,
            "base_fingerprint": base_fingerprint(model),
            "lora3_version": lora3.__version__,
            "format_version": FORMAT_VERSION,
            "sha256": sha256_file(os.path.join(tmp, WEIGHTS_NAME)),
            "extra_weights": sorted(extra),
            **({"base_residual": True} if residual else {}),
        }
        if extra:
            meta["extra_sha256"] = sha256_file(os.path.join(tmp, EXTRA_NAME))
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    return directory


def _config_matching(config, adapters):
    """`config`, with exact-path `rank_pattern` / `alpha_pattern` entries put first for any layer
    whose adapter's rank or alpha is not what `config` gives it, so replaying the config reproduces
    every layer (`adapters`: path -> `AdapterWeights`)."""
    ranks = {p: a.rank for p, a in adapters.items() if a.rank != config.rank_for(p)}
    alphas = {p: float(a.alpha) for p, a in adapters.items() if float(a.alpha) != config.alpha_for(p)}
    if not ranks and not alphas:
        return config
    return LoraConfig(**{**config.to_dict(),
                         "rank_pattern": {**{re.escape(p): r for p, r in ranks.items()}, **config.rank_pattern},
                         "alpha_pattern": {**{re.escape(p): a for p, a in alphas.items()}, **config.alpha_pattern}})


def read_adapter_config(directory) -> dict:
    """Reads and checks an adapter's `adapter_config.json`.

    Args:
        directory: str or path. The adapter directory.

    Returns:
        The JSON object as a dict, plus `"lora_config"`: the `LoraConfig`
        it describes.

    Raises:
        AdapterError: the directory or file is missing, the JSON is invalid,
            a required field is missing or has the wrong type, a layer path
            is not a model path, or the format is newer than this lora3
            (the message names the file and the field).

    Example:
    >>> import os, tempfile, keras_hub, lora3
    >>> def t5():
    ...     return keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
    ...                                        hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> backbone = t5()
    >>> _ = lora3.apply_lora(backbone, rank=2, targets="qv")
    >>> path = lora3.save_adapter(backbone, os.path.join(tempfile.mkdtemp(), "adapter"))
    >>> meta = read_adapter_config(path)
    >>> meta["rank"], meta["base_class"], meta["lora_config"].targets
    (2, 'T5Backbone', 'qv')
    """
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.isdir(os.fspath(directory)):
        raise AdapterError(f"adapter directory {os.fspath(directory)!r} does not exist")
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing: not a lora3 adapter directory")
    meta = read_json_object(path)
    for key, types in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in meta:
            if key in _OPTIONAL:
                continue
            raise AdapterError(f"{path} has no field {key!r} (required: {', '.join(_REQUIRED)})")
        value = meta[key]
        bad_bool = isinstance(value, bool) and types is not bool
        if bad_bool or not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise AdapterError(f"{path}: field {key!r} must be {names}, got {value!r}")
    for key in ("layer_paths", "train_also", "extra_weights"):
        if not all(isinstance(p, str) for p in meta.get(key) or []):
            raise AdapterError(f"{path}: field {key!r} must be a list of strings")
    if not meta["layer_paths"]:
        raise AdapterError(f"{path}: field 'layer_paths' is empty: the adapter adapts no layer")
    for p in meta["layer_paths"]:
        if p.startswith("/") or ".." in p.split("/") or not p:
            raise AdapterError(f"{path}: layer path {p!r} is not a model layer path")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise AdapterError(
            f"{path} has format_version {meta['format_version']}; this lora3 ({lora3.__version__}) "
            f"reads up to {FORMAT_VERSION}: upgrade lora3"
        )
    try:
        meta["lora_config"] = LoraConfig(
            rank=meta["rank"],
            alpha=meta["alpha"],
            targets=meta["targets"],
            dropout=meta["dropout"],
            rslora=meta["rslora"],
            init=meta.get("init", "kaiming"),
            layers=meta.get("layers"),
            train_also=meta.get("train_also") or (),
            rank_pattern=meta.get("rank_pattern") or {},
            alpha_pattern=meta.get("alpha_pattern") or {},
            exclude=meta.get("exclude") or (),
            dora=meta.get("dora", False),
        )
    except LoraConfigError as exc:
        raise AdapterError(f"{path}: {exc}") from None
    return meta


def _read_tensors(directory, meta, expected: dict, name=WEIGHTS_NAME, digest_key="sha256") -> str:
    """Checks a tensor file against its recorded hash and the expected keys/shapes.

    `expected` maps key -> shape. Reads only the header (no tensor), and
    returns the file's path for `safe_open`, so a large adapter is later read
    one tensor at a time.
    """
    path = os.path.join(os.fspath(directory), name)
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing")
    if sha256_file(path) != meta[digest_key]:
        raise AdapterError(
            f"{path} does not match the sha256 recorded in {CONFIG_NAME}: the file was altered, "
            "truncated or replaced"
        )
    try:
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file: {exc}") from None
    missing = sorted(set(expected) - keys)
    extra = sorted(keys - set(expected))
    if missing:
        raise AdapterError(f"{path} lacks tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        raise AdapterError(
            f"{path} has tensor(s) that name no adapted layer of this model: {extra[:4]}"
            f"{' ...' if len(extra) > 4 else ''}"
        )
    for key, shape in expected.items():
        if shapes[key] != tuple(shape):
            raise AdapterError(f"{path}: tensor {key!r} has shape {shapes[key]}, this model needs {tuple(shape)}")
        if dtypes[key] not in ("F32", "F16", "BF16"):
            raise AdapterError(f"{path}: tensor {key!r} has dtype {dtypes[key]}, expected a float type")
    return path


def load_adapter(model, directory, trainable=True, adapter_name=DEFAULT_ADAPTER, format=None) -> LoraReport:
    """Loads an adapter saved by `save_adapter` onto `model`, as adapter `adapter_name`.

    The directory may hold lora3's format or Hugging Face PEFT's
    (`adapter_model.safetensors`, read by
    `lora3.peft_format.load_peft_adapter`): detected, or named by `format`.

    Applies the surgery the adapter records when the model has no LoRA layers
    yet, or adds it as a new adapter beside the model's others (inactive, as
    PEFT's `load_adapter`: `lora3.set_adapter` activates it), or, when the
    model already has an adapter of that name, checks its layers match and
    replaces its weights. A and B are set one layer's tensors in memory at a
    time.

    Everything is checked before the model is touched: a base with another
    fingerprint or other shapes, a missing or extra tensor, a truncated or
    altered file, a malformed config all raise `AdapterError` and leave the
    model as it was.

    Args:
        model: the base model the adapter was trained on (a task or its
            backbone: both have the same fingerprint).
        directory: str or path. The adapter directory.
        trainable: bool. With `False` the LoRA (and `train_also`) weights
            are frozen, for inference. An inactive adapter stays frozen
            either way until `lora3.set_adapter` activates it.
        adapter_name: str. The name the adapter gets in the model.
        format: str or None. `"lora3"`, `"peft"`, or `None` to detect it
            from the files.

    Returns:
        A `LoraReport`.

    Raises:
        AdapterError: naming what does not fit or is damaged (also extra
            weights for a second adapter: they would overwrite weights the
            model's other adapters share).

    Example:
    >>> import os, tempfile, keras_hub, lora3
    >>> def t5():
    ...     return keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
    ...                                        hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> backbone = t5()
    >>> _ = lora3.apply_lora(backbone, rank=2, targets="qv")
    >>> path = lora3.save_adapter(backbone, os.path.join(tempfile.mkdtemp(), "adapter"))
    >>> report = lora3.load_adapter(t5(), path, trainable=False)
    >>> len(report.rows), report.trainable_params
    (6, 0)
    """
    if format not in (None, *FORMATS):
        raise AdapterError(f"format={format!r} is not an adapter format; use one of: {', '.join(FORMATS)} "
                           "(or None to detect it)")
    if format == "peft" or (format is None and is_peft_adapter(directory)
                            and not os.path.isfile(os.path.join(os.fspath(directory), WEIGHTS_NAME))):
        return load_peft_adapter(model, directory, trainable=trainable, adapter_name=adapter_name)
    try:
        check_adapter_name(adapter_name)
    except LoraConfigError as exc:
        raise AdapterError(str(exc)) from None
    meta = read_adapter_config(directory)
    config = meta["lora_config"]
    fingerprint = base_fingerprint(model)
    if meta["base_fingerprint"] != fingerprint:
        backbone = backbone_of(model)
        raise AdapterError(
            f"adapter in {os.fspath(directory)} was saved from a {meta['base_class']} with fingerprint "
            f"{meta['base_fingerprint']}; this model is a {type(backbone).__name__} with fingerprint "
            f"{fingerprint} (another architecture or size)"
        )
    paths = meta["layer_paths"]
    state = lora_state(model)
    existing = [w for w in lora_layers(model) if adapter_name in w.adapter_names]
    adding = bool(lora_layers(model)) and not existing
    residual = base_rewriting(config.init)
    if existing and residual:
        raise AdapterError(
            f"adapter in {os.fspath(directory)} has init={config.init!r}: it rewrites base kernels, and the "
            f"model's adapter {adapter_name!r} is already in place over them; load it onto a fresh base model")
    if existing:
        have = {w.path: w for w in existing}
        if set(have) != set(paths):
            raise AdapterError(
                f"the model already has LoRA on {len(have)} layers that differ from the adapter's "
                f"{len(paths)} layers; call lora3.merge_and_unload(model) or load onto a fresh model"
            )
        bad = [p for p in paths if have[p].get_adapter(adapter_name).dora != config.dora]
        if bad:
            raise AdapterError(f"the model's adapter {adapter_name!r} on {bad[0]!r} has dora="
                               f"{not config.dora}, the adapter file dora={config.dora}")
        bad = [p for p in paths if have[p].get_adapter(adapter_name).rank != config.rank_for(p)]
        if bad:
            raise AdapterError(f"the model's LoRA rank on {bad[0]!r} is "
                               f"{have[bad[0]].get_adapter(adapter_name).rank}, the adapter's {config.rank_for(bad[0])}")
        features = {p: (have[p].in_features, have[p].out_features) for p in paths}
        planned = None
    else:
        try:
            planned = plan(model, config, layer_paths=paths, adapter_name=adapter_name)
        except LoraConfigError as exc:
            raise AdapterError(f"adapter in {os.fspath(directory)} does not fit this model: {exc}") from None
        features = {p: (entry.in_features, entry.out_features) for p, entry in planned.items()}
    expected = {}
    for p, (fan_in, fan_out) in features.items():
        expected[f"{p}/lora_A"] = (fan_in, config.rank_for(p))
        expected[f"{p}/lora_B"] = (config.rank_for(p), fan_out)
        if config.dora:
            expected[f"{p}/lora_magnitude"] = (fan_out,)
        if residual and meta.get("base_residual"):
            expected[f"{p}/lora_A_init"] = (fan_in, config.rank_for(p))
            expected[f"{p}/lora_B_init"] = (config.rank_for(p), fan_out)
    weights_path = _read_tensors(directory, meta, expected)
    extra_names = meta.get("extra_weights") or []
    extra_path = None
    if extra_names and adding:
        raise AdapterError(
            f"adapter in {os.fspath(directory)} carries weights outside LoRA ({extra_names[:3]}); lora3 keeps one "
            "copy of those, shared by every adapter, so it loads them only as a model's first adapter"
        )
    if extra_names:
        variables = {v.path: v for v in model.weights}
        unknown = [n for n in extra_names if n not in variables]
        if unknown:
            raise AdapterError(f"extra weight(s) {unknown[:4]} name no variable of this model")
        if "extra_sha256" not in meta:
            raise AdapterError(f"{CONFIG_NAME} lists extra_weights but has no 'extra_sha256'")
        extra_expected = {n: tuple(variables[n].shape) for n in extra_names}
        extra_path = _read_tensors(directory, meta, extra_expected, EXTRA_NAME, "extra_sha256")

    # All checks passed: change the model, one layer's tensors in memory at a time.
    with safe_open(weights_path, framework="numpy") as f:

        def read(p):
            # A in the variable's (rank, in_features) layout: a view, copied once by the backend.
            arrays = (f.get_tensor(f"{p}/lora_A").astype(np.float32, copy=False).T,
                      f.get_tensor(f"{p}/lora_B").astype(np.float32, copy=False))
            if config.dora:
                arrays += (f.get_tensor(f"{p}/lora_magnitude").astype(np.float32, copy=False),)
            if residual:
                # PiSSA/OLoRA: the factors whose update comes out of the kernel (None: computed
                # from this base's kernel, as PEFT does when it loads such an adapter).
                arrays = arrays[:2] + (arrays[2] if config.dora else None,)
                arrays += ((f.get_tensor(f"{p}/lora_A_init").astype(np.float32, copy=False).T,
                            f.get_tensor(f"{p}/lora_B_init").astype(np.float32, copy=False))
                           if meta.get("base_residual") else None,)
            return arrays

        if planned is not None:
            # New LoRA layers are created from the file's values (no initial draw to overwrite).
            apply_plan(model, config, planned, initial_weights=read, adapter_name=adapter_name)
        else:
            wrappers = {w.path: w for w in existing}
            for p in paths:
                arrays = read(p)
                adapter = wrappers[p].get_adapter(adapter_name)
                for variable, value in zip(adapter.variables(), arrays):
                    variable.assign(value)
                del arrays
    state = lora_state(model)
    is_active = state is None or state.active == adapter_name
    for w in lora_layers(model):
        if adapter_name in w.adapter_names:
            for variable in w.get_adapter(adapter_name).variables():
                variable.trainable = trainable and is_active
    if extra_path is not None:
        variables = {v.path: v for v in model.weights}
        with safe_open(extra_path, framework="numpy") as f:
            for n in extra_names:
                variables[n].assign(f.get_tensor(n))
                variables[n].trainable = trainable
    reset_compiled_functions(model)
    return make_report(model)


def merge_and_unload(model):
    """Merges the active adapter into its kernels and puts the original layers back.

    As PEFT's `merge_and_unload()`: only the active adapter is merged; the
    model's other adapters are dropped with the wrappers (save them first
    with `save_adapter(..., adapter_name=...)` to keep them). Inside
    `lora3.disable_adapters` the active adapter is merged all the same.

    Args:
        model: a model with LoRA layers.

    Returns:
        The same model object, now a plain keras(-hub) model: no lora3 layer
        is left, the kernels hold `W + s * A @ B` of the active adapter, and
        the trainable flags are those the model had before `apply_lora` (see
        `lora3.surgery.unload`). Its `save_to_preset` directory loads with
        stock keras-hub.

    Raises:
        AdapterError: the model has no LoRA layers.

    Example:
    >>> import keras, numpy as np
    >>> class Block(keras.layers.Layer):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.proj = keras.layers.Dense(4, name="proj")
    ...     def call(self, x):
    ...         return self.proj(x)
    >>> model = keras.Sequential([keras.Input((4,)), Block(name="block")])
    >>> _ = lora3.apply_lora(model, rank=2, targets=".*block/proj")
    >>> for w in lora3.lora_layers(model):
    ...     _ = w.lora_B.assign(np.ones(w.lora_B.shape, "float32"))
    >>> x = np.ones((1, 4), "float32")
    >>> y = keras.ops.convert_to_numpy(model(x))
    >>> merged = merge_and_unload(model)
    >>> lora3.lora_layers(merged), bool(np.allclose(merged(x), y, atol=1e-5))
    ([], True)
    """
    wrappers = lora_layers(model)
    if not wrappers:
        raise AdapterError("the model has no LoRA layers to merge")
    for w in wrappers:
        w.merge()  # the active adapter's update; nothing where the layer lacks it
    return unload(model)
