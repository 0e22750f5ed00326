"""Hugging Face PEFT LoRA adapters: write lora3's LoRA layers as one, and load one into a keras-hub model.

A PEFT LoRA adapter directory holds `adapter_config.json` (a PEFT `LoraConfig`: `peft_type: "LORA"`,
`r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules`, ...) and
`adapter_model.safetensors`, keyed `base_model.model.<module>.lora_A.weight` `(r, in)` and
`base_model.model.<module>.lora_B.weight` `(out, r)`, where `<module>` is the Hugging Face module
name (`model.layers.0.self_attn.q_proj`). The update is `delta W = s * B @ A` with W as HF's
`(out, in)` Linear weight, `s = lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`). A DoRA adapter
(`use_dora: true`; Liu et al. 2024, arXiv:2402.09353) also holds
`base_model.model.<module>.lora_magnitude_vector` `(out,)`, lora3's `lora_magnitude`.

lora3 stores `lora_A` `(rank, in_features)` and `lora_B` `(rank, out_features)`, in the matrix view
of `lora3.layers` (kernel dims contracted with the input, in kernel order, by dims produced, in
output order). HF's flat `heads * head_dim` axis is head-major, i.e. the kernel's own dim order, as
keras-hub's Hugging Face converters read it (`(heads, hidden, head_dim)` for q/k/v, `(heads,
head_dim, hidden)` for o): A carries over as it is, B is transposed, and a side whose output order
differs from the kernel order is permuted (`_hf_order`).

Module names, per family (block `i`; T5 stacks `encoder` / `decoder`):

| keras-hub layer path                                   | Hugging Face module                               |
|--------------------------------------------------------|---------------------------------------------------|
| Gemma, Gemma 3: `decoder_block_i/attention/query`      | `model.layers.i.self_attn.q_proj` (k, v: `key`, `value`) |
| `decoder_block_i/attention/attention_output`           | `model.layers.i.self_attn.o_proj`                 |
| `decoder_block_i/ffw_gating`, `ffw_gating_2`, `ffw_linear` | `model.layers.i.mlp.gate_proj`, `up_proj`, `down_proj` |
| T5: `transformer_{encoder,decoder}_layer_i/self_attention/{query,key,value,output}_projector` | `{encoder,decoder}.block.i.layer.0.SelfAttention.{q,k,v,o}` |
| `transformer_decoder_layer_i/cross_attention/..._projector` | `decoder.block.i.layer.1.EncDecAttention.{q,k,v,o}` |
| `transformer_*_layer_i/input_projector`, `gate_projector`, `output_projector` | `...layer.{1 (encoder), 2 (decoder)}.DenseReluDense.wi_0 (wi when not gated), wi_1, wo` |

Only `keras.ops`, numpy, safetensors and json are used: no torch, transformers or peft.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import NamedTuple

import numpy as np
from keras import ops
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lora3 import targets as targets_lib
from lora3.config import DEFAULT_ADAPTER, LoraConfig, check_adapter_name
from lora3.errors import AdapterError, LoraConfigError
from lora3.fileio import read_json_object, staged_dir
from lora3.layers import LoRAEinsumDense, analyze_equation
from lora3.report import LoraReport
from lora3.surgery import (
    apply_plan,
    backbone_of,
    find_targets,
    lora_layers,
    lora_state,
    make_report,
    plan,
    reset_compiled_functions,
)

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# The backbone classes each Hugging Face layout is for (matched along the model's MRO).
FAMILY_BACKBONES = {"t5": ("T5Backbone",), "gemma": ("GemmaBackbone",), "gemma3": ("Gemma3Backbone",)}
TASK_TYPES = {"t5": "SEQ_2_SEQ_LM", "gemma": "CAUSAL_LM", "gemma3": "CAUSAL_LM"}
_GEMMA_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# Where a decoder-only model's blocks live in the Hugging Face module tree: `*ForCausalLM` (written),
# the bare `*Model`, and the text model inside a multimodal Gemma 3 (read).
_GEMMA_PREFIXES = ("model.", "", "model.language_model.", "language_model.model.")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# PEFT `init_lora_weights` values whose initialisation rewrites the base weights (W becomes a residual):
# PEFT repeats it when it loads such an adapter, so the adapter only works on that changed base.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# Those lora3 redoes as PEFT does when it loads such an adapter: a deterministic function of the base
# kernel (the residual W - s * A0.T @ B0 is written into it, then the file's trained A and B are set).
_REPRODUCIBLE_INITS = ("pissa", "olora")
_FORWARD_CHANGING = {  # options that change the LoRA forward pass or add tensors lora3 does not have
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "parameter targeting (target_parameters)",
}


class _Site(NamedTuple):
    """One adaptable layer and its Hugging Face module."""

    path: str  # keras-hub layer path
    hf: str  # Hugging Face module name (written layout, e.g. `model.layers.0.self_attn.q_proj`)
    short: str  # its last component (`q_proj`)
    block_path: str  # `hf` without the decoder-only prefix (`layers.0.self_attn.q_proj`), for reading


def _family_of(model):
    backbone = backbone_of(model)
    names = {c.__name__ for c in type(backbone).__mro__}
    for family, classes in FAMILY_BACKBONES.items():
        if names & set(classes):
            return family, backbone
    supported = ", ".join(c for classes in FAMILY_BACKBONES.values() for c in classes)
    raise AdapterError(
        f"PEFT adapters are supported for {supported} (and their tasks); this model is a "
        f"{type(backbone).__name__}, which has no Hugging Face module table in lora3"
    )


def _site(family, backbone, path):
    """The `_Site` of a keras-hub layer path, or None when the layer has no Hugging Face equivalent."""
    parsed = targets_lib.FAMILIES["t5" if family == "t5" else "gemma"].parse(path)
    if parsed is None:
        return None
    if family == "t5":
        gated = bool(getattr(backbone, "use_gated_activation", True))
        prefix = f"{parsed.stack}.block.{parsed.block}.layer."
        if parsed.attention == "self_attention":
            hf = f"{prefix}0.SelfAttention.{parsed.role}"
        elif parsed.attention == "cross_attention":
            hf = f"{prefix}1.EncDecAttention.{parsed.role}"
        else:
            short = {"gate": "wi_0" if gated else "wi", "up": "wi_1", "down": "wo"}[parsed.role]
            hf = f"{prefix}{1 if parsed.stack == 'encoder' else 2}.DenseReluDense.{short}"
        return _Site(path, hf, hf.rsplit(".", 1)[1], hf)
    block_path = f"layers.{parsed.block}.{_GEMMA_NAMES[parsed.role]}"
    return _Site(path, "model." + block_path, block_path.rsplit(".", 1)[1], block_path)


def _model_sites(model, family, backbone, extra_paths=()):
    """`{path: _Site}` for every adaptable layer of the model that has a Hugging Face module."""
    try:
        paths = list(find_targets(model, ".*"))
    except LoraConfigError:
        paths = []
    sites = {}
    for path in [*paths, *extra_paths]:
        site = _site(family, backbone, path)
        if site is not None:
            sites[path] = site
    return sites


def _supported_paths(family):
    if family == "t5":
        return ("transformer_{encoder,decoder}_layer_N/{self,cross}_attention/{query,key,value,output}_projector, "
                "transformer_{encoder,decoder}_layer_N/{input,gate,output}_projector")
    return "decoder_block_N/attention/{query,key,value,attention_output}, decoder_block_N/{ffw_gating,ffw_gating_2,ffw_linear}"


def _hf_order(layer):
    """How lora3's out-feature axis maps to Hugging Face's flat one for `layer` (the wrapped layer).

    Returns `None` when they are the same order, else `(sizes, permutation)`: B's out axis, reshaped
    to `sizes` (lora3's produced dims in output order), transposed by `permutation`, is HF's
    (the same dims in kernel order). The in-feature axes always agree: lora3 flattens the
    contracted dims in kernel order already.
    """
    if not isinstance(layer, LoRAEinsumDense.wrapped_class):
        return None
    info = analyze_equation(layer.equation, layer.kernel.shape)
    produced = info["produced"]
    kernel_dims = layer.equation.replace(" ", "").split("->")[0].split(",")[1].replace("...", "")
    in_kernel_order = "".join(d for d in kernel_dims if d in produced)
    if produced == in_kernel_order:
        return None
    return info["b_shape"], tuple(produced.index(d) for d in in_kernel_order)


def _b_to_hf(b, order):
    """lora3 B `(rank, out)` -> HF lora_B `(out, rank)`."""
    if order is not None:
        sizes, perm = order
        b = b.reshape((b.shape[0], *sizes)).transpose((0, *(p + 1 for p in perm))).reshape(b.shape[0], -1)
    return np.ascontiguousarray(b.T, dtype=np.float32)


def _b_from_hf(b_hf, order):
    """HF lora_B `(out, rank)` -> lora3 B `(rank, out)`."""
    b = np.asarray(b_hf, dtype=np.float32).T
    if order is not None:
        sizes, perm = order
        hf_sizes = tuple(sizes[p] for p in perm)
        inverse = tuple(int(i) for i in np.argsort(perm))
        b = b.reshape((b.shape[0], *hf_sizes)).transpose((0, *(i + 1 for i in inverse))).reshape(b.shape[0], -1)
    return np.ascontiguousarray(b)


def _most_common(values):
    """The most frequent of `values` (the first seen among equally frequent ones)."""
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.__getitem__)


def peft_pattern_key(patterns, name):
    """The key of a PEFT `rank_pattern` / `alpha_pattern` that applies to module `name`, or `None`.

    PEFT's rule (`peft.utils.other.get_pattern_key`): the first key for which
    `re.match(rf"(.*\.)?({key})$", name)` matches, in the mapping's order;
    failing that, `name` itself when it is a key.

    Args:
        patterns: mapping of str. The pattern keys.
        name: str. A Hugging Face module name (`model.layers.0.self_attn.q_proj`).

    Returns:
        The key, a str, or `None`.

    Raises:
        re.error: a key is not a valid regex.

    Example:
    >>> peft_pattern_key({"q_proj": 8, "layers.1.mlp.*": 2}, "model.layers.1.self_attn.q_proj")
    'q_proj'
    >>> peft_pattern_key({"q_proj": 8}, "model.layers.1.self_attn.k_proj") is None
    True
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name if name in patterns else None


def _hf_pattern_key(name, all_names):
    """A pattern key naming exactly module `name` among `all_names` under PEFT's rule: the name
    itself (as PEFT writes them), or the name with its dots escaped when it would match another."""
    if all(peft_pattern_key([name], other) is None for other in all_names if other != name):
        return name
    return re.escape(name)


def _number(x):
    return int(x) if float(x).is_integer() else float(x)


def peft_config_dict(*, r, lora_alpha, lora_dropout, use_rslora, target_modules, task_type,
                     base_model_name_or_path=None, use_dora=False) -> dict:
    """The `adapter_config.json` object PEFT 0.21's `LoraConfig.save_pretrained` writes, for a plain LoRA.

    Every field PEFT writes is present, with PEFT's defaults except those given (`peft_version` is
    left out: PEFT fills in its own when it reads the file).

    Args:
        r: int. The rank.
        lora_alpha: float. The scaling numerator.
        lora_dropout: float. Dropout on the LoRA branch's input.
        use_rslora: bool. Rank-stabilised scaling.
        target_modules: list of str or str. Module names or a regex, as PEFT reads them.
        task_type: str or None. `"CAUSAL_LM"`, `"SEQ_2_SEQ_LM"`, ...
        base_model_name_or_path: str or None.
        use_dora: bool. A DoRA adapter.

    Returns:
        A dict, ready for `json.dump`.

    Raises:
        Nothing: the values are written as given (`save_peft_adapter` checks them).

    Example:
    >>> d = peft_config_dict(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
    ...                      target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    >>> d["peft_type"], d["r"], d["lora_alpha"], d["bias"], d["rank_pattern"]
    ('LORA', 4, 8, 'none', {})
    """
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": _number(lora_alpha),
        "lora_bias": False,
        "lora_dropout": float(lora_dropout),
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "qalora_group_size": 16,
        "r": int(r),
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules,
        "target_parameters": None,
        "task_type": task_type,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": bool(use_dora),
        "use_qalora": False,
        "use_rslora": bool(use_rslora),
        "velora_config": None,
    }


def save_peft_adapter(model, directory, *, base_model_name_or_path=None, overwrite=True, adapter_name=None) -> str:
    """Writes the model's LoRA layers as a Hugging Face PEFT LoRA adapter directory.

    `PeftModel.from_pretrained(hf_model, directory)` on the Hugging Face model with the same base
    weights (`T5ForConditionalGeneration`, `GemmaForCausalLM`, `Gemma3ForCausalLM`) then computes
    what the keras-hub model computes. `target_modules` holds the short module names adapted
    (`["q_proj", "v_proj"]`) when every module of those names is adapted, else the full names of
    the adapted modules (PEFT matches a full name exactly). The directory is written whole or not
    at all (`lora3.fileio.staged_dir`); everything is checked before anything is written.

    Args:
        model: a keras-hub `T5Backbone` / `GemmaBackbone` / `Gemma3Backbone` (text only) or one
            of their tasks, with lora3 LoRA layers (`lora3.apply_lora` or `lora3.load_adapter`).
        directory: str or path. The adapter directory to write.
        base_model_name_or_path: str or None. Written into the config (the Hugging Face model id
            or path the adapter is for).
        overwrite: bool. With `False` an existing directory is refused.
        adapter_name: str or None. The adapter to write (PEFT's files carry no
            name); `None` for the active one.

    Returns:
        The absolute path of the directory, a str.

    Raises:
        AdapterError: the model has no LoRA layers, is of a family without a Hugging Face table,
            has a LoRA layer with no Hugging Face module (naming it and the supported layers),
            mixes dropouts or rslora across layers (naming the first layer that differs), or
            `directory` exists and `overwrite=False`. Ranks and alphas may differ: the most
            common ones are written as `r` / `lora_alpha` and the others as `rank_pattern` /
            `alpha_pattern`, keyed by full module names.

    Example:
    >>> import json, os, tempfile, keras_hub, lora3
    >>> backbone = keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
    ...     hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> _ = lora3.apply_lora(backbone, rank=2, alpha=4, targets="qv")
    >>> path = save_peft_adapter(backbone, os.path.join(tempfile.mkdtemp(), "peft"))
    >>> sorted(os.listdir(path))
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> config = json.load(open(os.path.join(path, "adapter_config.json")))
    >>> config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]
    ('LORA', 2, 4, ['q', 'v'])
    """
    wrappers = lora_layers(model)
    if not wrappers:
        raise AdapterError("the model has no LoRA layers to save; call lora3.apply_lora(model, ...) first")
    state = lora_state(model)
    name = (state.active if state else wrappers[0].active_adapter) if adapter_name is None else adapter_name
    known = list(state.adapters) if state else sorted({n for w in wrappers for n in w.adapter_names})
    if name not in known:
        raise AdapterError(f"the model has no adapter {name!r} (its adapters: {', '.join(known)})")
    wrappers = [w for w in wrappers if name in w.adapter_names]
    adapters = {w.path: w.get_adapter(name) for w in wrappers}
    family, backbone = _family_of(model)
    if family == "gemma3" and getattr(backbone, "vision_encoder", None) is not None:
        raise AdapterError(
            "this Gemma3Backbone has a vision encoder: PEFT export supports text-only Gemma 3 "
            "(Hugging Face Gemma3ForCausalLM); the multimodal module layout is not supported"
        )
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise AdapterError(f"{directory} already exists; pass overwrite=True or choose another directory")
    sites = _model_sites(model, family, backbone, [w.path for w in wrappers])
    unmapped = [w.path for w in wrappers if w.path not in sites]
    if unmapped:
        raise AdapterError(
            f"LoRA layer(s) {unmapped[:4]}{' ...' if len(unmapped) > 4 else ''} have no Hugging Face "
            f"module in the {family} layout; PEFT export supports: {_supported_paths(family)}"
        )
    first = adapters[wrappers[0].path]
    for w in wrappers[1:]:
        for field in ("dropout", "rslora", "dora"):
            if getattr(adapters[w.path], field) != getattr(first, field):
                raise AdapterError(
                    f"LoRA layer {w.path!r} has {field}={getattr(adapters[w.path], field)!r} but "
                    f"{wrappers[0].path!r} has {field}={getattr(first, field)!r}: a PEFT adapter has one "
                    f"{field} for all its modules (only ranks and alphas may differ, as rank_pattern / alpha_pattern)"
                )
    adapted = [sites[w.path] for w in wrappers]
    shorts = sorted({s.short for s in adapted})
    same_named = {s.hf for s in sites.values() if s.short in shorts}
    if same_named == {s.hf for s in adapted}:
        target_modules = shorts
    else:
        target_modules = sorted(s.hf for s in adapted)
    exported = {w.path: _exported_factors(w, adapters[w.path]) for w in wrappers}  # (A, B, rank, alpha)
    tensors = {}
    for w, site in zip(wrappers, adapted):
        a = np.ascontiguousarray(exported[w.path][0], dtype=np.float32)
        b = _b_to_hf(np.asarray(exported[w.path][1], dtype=np.float32), _hf_order(w.wrapped))
        tensors[f"{KEY_PREFIX}{site.hf}.lora_A.weight"] = a
        tensors[f"{KEY_PREFIX}{site.hf}.lora_B.weight"] = b
        if adapters[w.path].dora:
            m = np.asarray(ops.convert_to_numpy(adapters[w.path].lora_magnitude), dtype=np.float32)
            tensors[f"{KEY_PREFIX}{site.hf}.lora_magnitude_vector"] = _b_to_hf(m[None, :], _hf_order(w.wrapped))[:, 0]
    r = _most_common([exported[w.path][2] for w in wrappers])
    lora_alpha = _most_common([exported[w.path][3] for w in wrappers])
    all_names = [site.hf for site in sites.values()]
    rank_pattern, alpha_pattern = {}, {}
    for w, site in zip(wrappers, adapted):
        if exported[w.path][2] != r:
            rank_pattern[_hf_pattern_key(site.hf, all_names)] = int(exported[w.path][2])
        if exported[w.path][3] != lora_alpha:
            alpha_pattern[_hf_pattern_key(site.hf, all_names)] = _number(exported[w.path][3])
    config = peft_config_dict(
        r=r, lora_alpha=lora_alpha, lora_dropout=first.dropout, use_rslora=first.rslora,
        target_modules=target_modules, task_type=TASK_TYPES[family],
        base_model_name_or_path=base_model_name_or_path, use_dora=first.dora,
    )
    config["rank_pattern"], config["alpha_pattern"] = rank_pattern, alpha_pattern
    with staged_dir(directory) as tmp:
        save_file(tensors, os.path.join(tmp, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, PEFT_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    return directory


def _exported_factors(wrapper, adapter):
    """`(A, B, rank, alpha)` a PEFT file gets for one layer: A `(rank, in)`, B in lora3's `(rank, out)`.

    A PiSSA/OLoRA adapter trained over the residual `W - s * A0.T @ B0` is converted to a plain
    LoRA adapter over the original `W`, as PEFT's `save_pretrained(...,
    path_initial_model_for_weight_conversion=...)` does (`LoraModel.subtract_mutated_init`):
    `s * A.T @ B - s * A0.T @ B0 = s * [A; A0].T @ [B; -B0]`, rank `2r`, and alpha doubled
    (times sqrt(2) with rslora) so that `s` is unchanged. PEFT loads it onto the unchanged base
    model with `init_lora_weights=True`.
    """
    a = np.asarray(ops.convert_to_numpy(adapter.lora_A), dtype=np.float32)
    b = np.asarray(ops.convert_to_numpy(adapter.lora_B), dtype=np.float32)
    if not adapter.rewrites_base:
        return a, b, int(adapter.rank), float(adapter.alpha)
    if adapter.initial_factors is None:
        raise AdapterError(
            f"LoRA layer {wrapper.path!r}: adapter {adapter.name!r} (init={adapter.init!r}) was trained over a "
            "residual base kernel, and the factors it started from are unknown (a model loaded from a .keras "
            "file keeps the residual, not those), so it cannot be converted to an adapter of the original "
            "base; merge it instead (lora3.merge_and_unload) and export the model")
    a0, b0 = (np.asarray(x, dtype=np.float32) for x in adapter.initial_factors)
    alpha = float(adapter.alpha) * (math.sqrt(2.0) if adapter.rslora else 2.0)
    return np.concatenate([a, a0]), np.concatenate([b, -b0]), 2 * int(adapter.rank), alpha


def is_peft_adapter(directory) -> bool:
    """Whether `directory` holds a Hugging Face PEFT adapter (not a lora3 one).

    A PEFT directory has an `adapter_config.json` with a `peft_type` field and its tensors in
    `adapter_model.safetensors` (or the pickled `adapter_model.bin`, which `load_peft_adapter`
    refuses by name); a lora3 directory has `adapter.safetensors` and no `peft_type`. Never raises.

    Args:
        directory: str or path.

    Returns:
        bool.

    Raises:
        Nothing: a missing, unreadable or malformed directory is simply not a PEFT adapter.

    Example:
    >>> import os, tempfile, keras_hub, lora3
    >>> backbone = keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
    ...     hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> _ = lora3.apply_lora(backbone, rank=2, targets="qv")
    >>> root = tempfile.mkdtemp()
    >>> is_peft_adapter(save_peft_adapter(backbone, os.path.join(root, "peft")))
    True
    >>> is_peft_adapter(lora3.save_adapter(backbone, os.path.join(root, "lora3")))
    False
    >>> is_peft_adapter(os.path.join(root, "missing"))
    False
    """
    directory = os.fspath(directory)
    try:
        with open(os.path.join(directory, PEFT_CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or "peft_type" not in config:
        return False
    return any(os.path.isfile(os.path.join(directory, n)) for n in (PEFT_WEIGHTS_NAME, PEFT_BIN_NAME))


def read_peft_config(directory) -> dict:
    """Reads a PEFT LoRA `adapter_config.json` and refuses what lora3 cannot represent.

    Args:
        directory: str or path. The adapter directory.

    Returns:
        The JSON object as a dict.

    Raises:
        AdapterError: the directory or a file is missing (or the tensors are only in
            `adapter_model.bin`), the JSON is invalid, `peft_type` is not `"LORA"`, `r`,
            `lora_alpha`, `lora_dropout` or `use_rslora` is missing or of the wrong type, or an
            option lora3 cannot represent is set (`bias` other than `"none"`, `modules_to_save`,
            `lora_bias`, `layer_replication`, `init_lora_weights` that rewrites the
            base weights, ...), or `rank_pattern` / `alpha_pattern` is not a mapping of valid
            regexes to positive ranks / alphas: the message names it.

    Example:
    >>> import json, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> open(os.path.join(d, "adapter_model.safetensors"), "wb").close()
    >>> json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_bias": True},
    ...           open(os.path.join(d, "adapter_config.json"), "w"))
    >>> read_peft_config(d)
    Traceback (most recent call last):
    ...
    lora3.errors.AdapterError: ...lora_bias=True (a bias on lora_B): lora3 has plain LoRA only...
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory {directory!r} does not exist")
    path = os.path.join(directory, PEFT_CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"{path} is missing: not a PEFT adapter directory")
    if not os.path.isfile(os.path.join(directory, PEFT_WEIGHTS_NAME)):
        if os.path.isfile(os.path.join(directory, PEFT_BIN_NAME)):
            raise AdapterError(
                f"{directory} holds {PEFT_BIN_NAME} (pickled PyTorch tensors), which lora3 does not read: "
                f"convert it to {PEFT_WEIGHTS_NAME} first (with PEFT: PeftModel.from_pretrained(...)"
                ".save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterError(f"{os.path.join(directory, PEFT_WEIGHTS_NAME)} is missing")
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type={peft_type!r}; lora3 reads LoRA adapters only (peft_type 'LORA')")
    for key, types, name in (("r", int, "a positive integer"), ("lora_alpha", (int, float), "a number"),
                             ("lora_dropout", (int, float), "a number in [0, 1)"), ("use_rslora", bool, "true or false"),
                             ("use_dora", bool, "true or false")):
        if key not in config and key in ("lora_dropout", "use_rslora", "use_dora"):
            continue  # PEFT's defaults: 0.0 and false
        value = config.get(key)
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types):
            raise AdapterError(f"{path}: {key}={value!r} is not valid; it must be {name}")

    def refuse(key, value, why):
        raise AdapterError(f"{path}: {key}={value!r} {why}")

    bias = config.get("bias", "none")
    if bias != "none":
        refuse("bias", bias, "(trained bias terms) is not supported: lora3 reads adapters with bias='none'")
    if config.get("modules_to_save"):
        refuse("modules_to_save", config["modules_to_save"],
               "is not supported: the adapter carries fully trained modules lora3 cannot load; "
               "valid: null or []")
    for key, what in _FORWARD_CHANGING.items():
        value = config.get(key)
        if value not in (None, False, [], {}):
            refuse(key, value, f"({what}): lora3 has plain LoRA only; valid: {key}=null/false")
    if config.get("layer_replication"):
        refuse("layer_replication", config["layer_replication"],
               "is not supported: it builds a model with repeated layers; valid: null")
    for key, what in (("rank_pattern", "a positive integer"), ("alpha_pattern", "a positive number")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            refuse(key, pattern, "must be a mapping of module-name regex -> value")
        for k, v in pattern.items():
            try:
                re.compile(k)
            except re.error as exc:
                refuse(key, pattern, f"has key {k!r}, which is not a valid regex: {exc}")
            number = isinstance(v, int) if key == "rank_pattern" else isinstance(v, (int, float))
            if isinstance(v, bool) or not number or not v > 0:
                refuse(key, pattern, f"has value {v!r} for {k!r}; it must be {what}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS) and init not in _REPRODUCIBLE_INITS:
        refuse("init_lora_weights", init,
               "rewrites the base weights when PEFT loads the adapter (a residual base) by a method lora3 "
               "cannot reproduce exactly (lora3 reproduces 'pissa' and 'olora'; a randomised SVD or a "
               "data-dependent init differs run to run); convert the adapter with PEFT's "
               "path_initial_model_for_weight_conversion (then init_lora_weights is true)")
    if config.get("exclude_modules") is not None and not isinstance(config["exclude_modules"], (str, list)):
        refuse("exclude_modules", config["exclude_modules"], "must be null, a regex string or a list of names")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        refuse("target_modules", targets, "must be a regex string or a list of module names")
    return config


def _peft_targets(config, key):
    """Whether PEFT would adapt module `key` under `config` (PEFT's `check_target_module_exists`)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return True  # every linear layer but the output head: every module lora3 maps
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _read_float(f, path, key, dtype):
    """A tensor as float32 numpy; bfloat16 (which numpy lacks) is widened by hand."""
    if dtype != "BF16":
        return f.get_tensor(key).astype(np.float32, copy=False)
    with open(path, "rb") as raw:
        header_len = int.from_bytes(raw.read(8), "little")
        entry = json.loads(raw.read(header_len))[key]
        start, end = entry["data_offsets"]
        raw.seek(8 + header_len + start)
        bits = np.frombuffer(raw.read(end - start), dtype="<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def load_peft_adapter(model, directory, trainable=True, *, adapter_name=None) -> LoraReport:
    """Loads a Hugging Face PEFT LoRA adapter into a keras-hub model, as lora3 LoRA layers.

    The adapter's modules are mapped to keras-hub layer paths (see the module's table) and
    everything is checked before the model is touched: the config (options lora3 cannot
    represent are refused by name), that every tensor is a LoRA A or B of a module this model
    has, that `target_modules` selects exactly the modules the file holds, the shapes and the
    dtypes. Then the layers are wrapped with the file's values (`lora3.surgery.apply_plan`).

    Args:
        model: a keras-hub `T5Backbone` / `GemmaBackbone` / `Gemma3Backbone` or one of their
            tasks, with the base weights the adapter was trained on, and no LoRA layers yet.
        directory: str or path. The PEFT adapter directory (`adapter_config.json` and
            `adapter_model.safetensors`).
        trainable: bool. With `False` the LoRA weights are frozen, for inference.
        adapter_name: str or None. The name the adapter gets in the model
            (`None`: `"default"`). On a model that already has adapters it is
            added beside them, inactive, as PEFT's `load_adapter`
            (`lora3.set_adapter` activates it); a name the model already has
            is refused.

    Returns:
        A `LoraReport`.

    Raises:
        AdapterError: naming what does not fit (see `read_peft_config` for the config; also a
            model family without a Hugging Face table, an adapter name the model already has, a
            module the model does not have, a tensor that is no LoRA A/B, a missing A or B, a
            wrong shape or a non-float dtype). The model is left unchanged.

    Example:
    >>> import os, tempfile, keras_hub, lora3
    >>> def t5():
    ...     return keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
    ...                                        hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> backbone = t5()
    >>> _ = lora3.apply_lora(backbone, rank=2, targets="all_linear")
    >>> path = save_peft_adapter(backbone, os.path.join(tempfile.mkdtemp(), "peft"))
    >>> report = load_peft_adapter(t5(), path, trainable=False)
    >>> len(report.rows), report.trainable_params
    (18, 0)
    """
    adapter_name = DEFAULT_ADAPTER if adapter_name is None else adapter_name
    try:
        check_adapter_name(adapter_name)
    except LoraConfigError as exc:
        raise AdapterError(str(exc)) from None
    family, backbone = _family_of(model)
    taken = sorted({n for w in lora_layers(model) for n in w.adapter_names})
    if adapter_name in taken:
        raise AdapterError(
            f"the model already has an adapter named {adapter_name!r} (its adapters: {', '.join(taken)}); "
            "load the PEFT adapter under another adapter_name, or lora3.delete_adapter / lora3.unload first"
        )
    config = read_peft_config(directory)
    cfg_path = os.path.join(os.fspath(directory), PEFT_CONFIG_NAME)
    weights_path = os.path.join(os.fspath(directory), PEFT_WEIGHTS_NAME)
    rank = config["r"]
    try:
        lora_config = LoraConfig(
            rank=rank, alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False), dora=config.get("use_dora", False),
            init=(config["init_lora_weights"] if config.get("init_lora_weights") in ("gaussian", *_REPRODUCIBLE_INITS)
                  else "kaiming"),
        )
    except LoraConfigError as exc:
        raise AdapterError(f"{cfg_path}: {exc}") from None

    try:
        with safe_open(weights_path, framework="numpy") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights_path} is not a readable safetensors file: {exc}") from None
    if not keys:
        raise AdapterError(f"{weights_path} holds no tensor: the adapter adapts no module")

    modules = {}  # HF module name (as in the file, without KEY_PREFIX) -> {"A": key, "B": key}
    for key in keys:
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"{weights_path}: tensor {key!r} does not start with {KEY_PREFIX!r}")
        name = key[len(KEY_PREFIX):]
        m = re.fullmatch(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                         r"lora_magnitude_vector)(?:\.(?P<param>weight|bias))?", name)
        if m and m["kind"].startswith("lora_embedding"):
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is an embedding adapter (lora_embedding_A/B); "
                "lora3 adapts Dense/EinsumDense projections only"
            )
        if m and m["kind"] == "lora_magnitude_vector":
            if not lora_config.dora:
                raise AdapterError(f"{weights_path}: tensor {key!r} is a DoRA magnitude, but {cfg_path} "
                                   "does not set use_dora: true")
            if m["param"] not in (None, "weight"):
                raise AdapterError(f"{weights_path}: tensor {key!r} is not a DoRA magnitude vector")
            modules.setdefault(m["module"], {})["M"] = key
            continue
        if m and m["param"] == "bias":
            raise AdapterError(f"{weights_path}: tensor {key!r} is a LoRA bias (lora_bias); lora3 has none")
        if not m or m["param"] != "weight":
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is not a LoRA weight (<module>.lora_A.weight or "
                "<module>.lora_B.weight): fully trained modules or other tensors are not supported"
            )
        modules.setdefault(m["module"], {})[m["kind"][-1]] = key

    sites = _model_sites(model, family, backbone)
    if family == "t5":
        by_name = {s.hf: s for s in sites.values()}
        prefix = ""
    else:
        prefixes = [p for p in _GEMMA_PREFIXES if all(n.startswith(p + "layers.") for n in modules)]
        prefix = prefixes[0] if prefixes else "model."
        by_name = {prefix + s.block_path: s for s in sites.values()}
    unknown = [n for n in modules if n not in by_name]
    if unknown:
        sample = sorted(by_name)[:4]
        raise AdapterError(
            f"{weights_path}: module(s) {sorted(unknown)[:4]}{' ...' if len(unknown) > 4 else ''} are not "
            f"modules of this {type(backbone).__name__} that lora3 can adapt (it has, e.g., {sample}; "
            f"keras-hub layers: {_supported_paths(family)})"
        )
    for name, kinds in sorted(modules.items()):
        for kind in "AB":
            if kind not in kinds:
                raise AdapterError(f"{weights_path}: module {name!r} has no lora_{kind}.weight tensor")
        if lora_config.dora and "M" not in kinds:
            raise AdapterError(f"{weights_path}: module {name!r} has no lora_magnitude_vector tensor, which "
                               "a DoRA adapter (use_dora: true) needs")
    try:
        chosen = {n for n in by_name if _peft_targets(config, n)}
    except re.error as exc:
        raise AdapterError(f"{cfg_path}: target_modules={config.get('target_modules')!r} is not a valid regex: {exc}")
    not_targeted = sorted(set(modules) - chosen)
    if not_targeted:
        raise AdapterError(
            f"{weights_path} holds tensors for {not_targeted[:4]}, which target_modules="
            f"{config.get('target_modules')!r} does not select: PEFT would not use them"
        )
    missing = sorted(chosen - set(modules))
    if missing:
        raise AdapterError(
            f"target_modules={config.get('target_modules')!r} in {cfg_path} selects {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, but {weights_path} has no tensors for them"
        )

    paths = [by_name[n].path for n in modules]
    order = {p: i for i, p in enumerate(sites)}
    paths.sort(key=order.__getitem__)
    hf_of = {by_name[n].path: n for n in modules}
    rank_pattern, alpha_pattern = {}, {}
    for path in paths:
        # PEFT's per-module settings, found on the module names as in the file.
        for field, default, out in (("rank_pattern", rank, rank_pattern),
                                    ("alpha_pattern", lora_config.alpha, alpha_pattern)):
            patterns = config.get(field) or {}
            key = peft_pattern_key(patterns, hf_of[path])
            value = default if key is None else patterns[key]
            if value != default:
                out[re.escape(path)] = value
    lora_config = LoraConfig(**{**lora_config.to_dict(), "targets": [re.escape(p) for p in paths],
                                "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})
    try:
        planned = plan(model, lora_config, layer_paths=paths, adapter_name=adapter_name)
    except LoraConfigError as exc:
        raise AdapterError(f"PEFT adapter in {os.fspath(directory)} does not fit this model: {exc}") from None
    orders = {}
    for path, entry in planned.items():
        name = hf_of[path]
        a_key, b_key = modules[name]["A"], modules[name]["B"]
        r = lora_config.rank_for(path)
        wanted = [(a_key, (r, entry.in_features)), (b_key, (entry.out_features, r))]
        if lora_config.dora:
            wanted.append((modules[name]["M"], (entry.out_features,)))
        for key, want in wanted:
            if shapes[key] != want:
                raise AdapterError(
                    f"{weights_path}: tensor {key!r} has shape {shapes[key]}, this model (layer {path!r}) "
                    f"needs {want} for r={r}"
                )
            if dtypes[key] not in _FLOAT_DTYPES:
                raise AdapterError(
                    f"{weights_path}: tensor {key!r} has dtype {dtypes[key]}, expected a float type "
                    f"({', '.join(_FLOAT_DTYPES)})"
                )
        orders[path] = _hf_order(entry.layer)

    # Every check passed: change the model, one layer's tensors in memory at a time.
    with safe_open(weights_path, framework="numpy") as f:

        def read(path):
            name = hf_of[path]
            a_key, b_key = modules[name]["A"], modules[name]["B"]
            a = np.ascontiguousarray(_read_float(f, weights_path, a_key, dtypes[a_key]))
            b = _b_from_hf(_read_float(f, weights_path, b_key, dtypes[b_key]), orders[path])
            if not lora_config.dora:
                return a, b
            m_key = modules[name]["M"]
            m = _b_from_hf(_read_float(f, weights_path, m_key, dtypes[m_key])[:, None], orders[path])[0]
            return a, b, m

        apply_plan(model, lora_config, planned, initial_weights=read, adapter_name=adapter_name)
    # A model's first adapter is active; one added beside others stays inactive (frozen) until
    # `lora3.set_adapter`, as PEFT's `load_adapter`.
    state = lora_state(model)
    is_active = state is None or state.active == adapter_name
    for w in lora_layers(model):
        if adapter_name in w.adapter_names:
            for variable in w.get_adapter(adapter_name).variables():
                variable.trainable = trainable and is_active
    reset_compiled_functions(model)
    return make_report(model)


__all__ = ["save_peft_adapter", "load_peft_adapter", "is_peft_adapter", "read_peft_config", "peft_config_dict",
           "peft_pattern_key"]
