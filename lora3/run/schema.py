"""The app's config, typed once: pydantic models mirroring `conf/` (one model per config group).

`validate(cfg)` checks a composed config (a Hydra `DictConfig` or a plain dict) against `AppConfig`
and returns it as a plain, resolved dict; every problem is reported at once, naming the key, the
value and what is valid:

    invalid config: trainer.lr=0 is not valid: it must be a positive number; trainer.max_stepz is not a
    key of the config (valid keys under trainer: batch_size, epochs, ...; did you mean trainer.max_steps?)

The `lora` node is the library's own `lora3.LoraConfig` (its `__post_init__` is where rank, alpha and
dropout are checked, for the app as for the Python API), extended by what the run does with an adapter
(`RunLoraConfig`: `init_from`, `export`). Models are strict (no `"3"` for an int, no
`2` for a bool) and closed (`extra="forbid"`): a key the schema does not know is an error with the
closest valid key. The command line runs this before Hydra creates any directory (`cli.precheck`).

Example:
>>> validate({"rank": 4})["rank"]
4
>>> validate({"rank": 0})
Traceback (most recent call last):
...
lora3.run.schema.AppConfigError: invalid config: rank=0 is not valid: it must be a positive integer
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from typing import Annotated, Any, Mapping, Optional, Union

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora3.config import LoraConfig
from lora3.errors import Lora3Error, LoraConfigError
from lora3.run import remat as remat_modes

BACKENDS = ("jax", "tensorflow")
FINETUNE = ("lora", "full", "none")
EXPORTS = ("none", "peft")
BASE_QUANTIZATIONS = ("none", "int8", "int4")  # Keras' model.quantize modes lora3 wraps (lora.base_quantization)
WANDB_MODES = ("offline", "online", "disabled")
FAMILIES = ("t5", "gemma", "gemma3")
DATA_SOURCES = ("synthetic", "files", "jsonl", "wmt16")
DIRECTIONS = ("de-en", "en-de")
OVERLONG = ("truncate", "drop", "error")
SYNTHETIC_VARIANTS = ("all", "base", "shift")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
REMAT_MODES = remat_modes.MODES
DIST_MODES = ("none", "data_parallel", "model_parallel")
DATA_FORMATS = ("auto", "jsonl", "plain")
VERBOSITY = ("auto", 0, 1, 2)
ON_INDIVISIBLE = ("replicate", "error")
UNEVEN_BATCH = ("pad", "error")


CONF_MODULE = "lora3.run.conf"  # conf/ of the source tree, shipped in the wheel under this name


def _register_resolvers():
    """`${mul:${rank},2}`: alpha = 2r in a sweep (`-m rank=1,2,4 'alpha=${mul:${rank},2}'`)."""
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda *xs: math.prod(xs))


_register_resolvers()


def compose(overrides=(), *, return_hydra_config: bool = False):
    """The app's config composed from `conf/` with `overrides` (Hydra's compose API), not validated."""
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3", job_name="lora3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)


class AppConfigError(Lora3Error):
    """A config value is of the wrong type, out of range, or a key the schema does not know."""


# ---------------------------------------------------------------- field types
# `description` is what the error message says a value must be.


def Choice(*choices, kind=str):
    """A value that must be one of `choices`: the check and the message's "one of ..." in one place."""
    def check(value):
        if value not in choices:
            raise ValueError("not one of the choices")
        return value

    return Annotated[kind, AfterValidator(check), Field(description="one of " + ", ".join(map(str, choices)))]


PositiveInt = Annotated[int, Field(gt=0, description="a positive integer")]
NonNegInt = Annotated[int, Field(ge=0, description="an integer >= 0")]
PositiveNum = Annotated[float, Field(gt=0, allow_inf_nan=False, description="a positive number")]
NonNegNum = Annotated[float, Field(ge=0, allow_inf_nan=False, description="a number >= 0")]
UnitNum = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, description="a number in [0, 1]")]
Bool = Annotated[bool, Field(description="true or false")]
NonEmptyStr = Annotated[str, Field(min_length=1, pattern=r"\S", description="a non-empty string")]
TARGETS_MUST = "a role, group or regex (e.g. qv, attention, all_linear) or a list of them"
Targets = Annotated[Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1)]],
                    Field(description=TARGETS_MUST)]


class _Node(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", validate_default=False)


class BaseConfig(_Node):
    """`model.base`: the small base the offline default trains once and adapts (lora3.run.pretrain)."""

    variant: Choice(*SYNTHETIC_VARIANTS) = "base"
    direction: Choice(*DIRECTIONS) = "de-en"
    train_size: PositiveInt = 20000
    valid_size: PositiveInt = 200
    tokenizer_variant: Choice(*SYNTHETIC_VARIANTS) = "all"
    tokenizer_size: PositiveInt = 8000
    mono_variant: Choice(*SYNTHETIC_VARIANTS) = "all"
    mono_size: NonNegInt = 10000
    mono_noise: UnitNum = 0.15
    data: Optional[dict[str, Any]] = None      # a data config: a source task from files (e.g. Multi30K)
    max_source_length: PositiveInt = 40
    max_target_length: PositiveInt = 40
    steps: PositiveInt = 800
    batch_size: PositiveInt = 32
    lr: PositiveNum = 3e-3
    warmup_steps: NonNegInt = 60
    weight_decay: NonNegNum = 0.01
    min_lr_ratio: UnitNum = 0.1
    grad_clip: Optional[PositiveNum] = 1.0
    seed: NonNegInt = 0
    eval_every: PositiveInt = 200
    eval_samples: PositiveInt = 64




class ModelConfig(_Node):
    name: NonEmptyStr = "model"
    family: Choice(*FAMILIES) = "t5"
    preset: Optional[NonEmptyStr] = None
    gguf: Optional[NonEmptyStr] = None
    hf_name: Optional[NonEmptyStr] = None   # the Hugging Face id of the same weights (a PEFT copy names it)
    config: Optional[dict[str, Any]] = None
    embedding_init_stddev: Optional[PositiveNum] = None
    base: Optional[BaseConfig] = None
    prompt_template: Optional[Annotated[str, Field(description=(
        'a string with a {source} (or {input}) slot and no other {...} field, '
        'e.g. "Translate German to English: {source}\\nEnglish:"'))]] = None
    completion_prefix: Optional[Annotated[str, Field(description="a string")]] = None


    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v):
        if v is None:
            return v
        ok = "{source}" in v or "{input}" in v
        try:
            v.format(source="", input="")
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise ValueError("no {source} slot")
        return v


class DataConfig(_Node):
    """`data`: one node for every source; keys a source does not use are ignored by it."""

    name: Optional[str] = None
    source: Choice(*DATA_SOURCES) = "synthetic"
    path: Optional[str] = None
    valid_path: Optional[str] = None
    format: Choice(*DATA_FORMATS) = "auto"
    train_split: Optional[str] = None
    valid_split: Optional[str] = None
    test_split: Optional[str] = None
    valid_fraction: Annotated[float, Field(gt=0, lt=1, description="a number in (0, 1)")] = 0.05
    variant: Choice(*SYNTHETIC_VARIANTS) = "shift"
    train_size: PositiveInt = 4000
    valid_size: PositiveInt = 300
    direction: Choice(*DIRECTIONS) = "de-en"
    prefix: Annotated[str, Field(description='a string ("auto" for the T5 prefix, "" for none)')] = "auto"
    max_source_length: PositiveInt = 48
    max_target_length: PositiveInt = 48
    overlong: Choice(*OVERLONG) = "truncate"
    max_train: Optional[PositiveInt] = None
    max_valid: Optional[PositiveInt] = None







class TrainerConfig(_Node):
    max_steps: Optional[PositiveInt] = 300
    epochs: Optional[PositiveNum] = None
    batch_size: PositiveInt = 32
    lr: PositiveNum = 3e-3
    weight_decay: NonNegNum = 0.01
    warmup_steps: NonNegInt = 30
    schedule: Choice(*SCHEDULES) = "cosine"
    min_lr_ratio: UnitNum = 0.1
    grad_clip: Optional[PositiveNum] = 1.0
    precision: Choice(*PRECISIONS) = "float32"
    jit_compile: Bool = True
    keep_checkpoints: PositiveInt = 2
    verbose: Choice(*VERBOSITY, kind=Union[str, int]) = "auto"
    skip_nonfinite: Bool = False
    lora_plus_ratio: Optional[PositiveNum] = None   # LoRA+: B's learning rate = ratio x A's (null: off)
    remat: Choice(*REMAT_MODES) = "none"              # lora3.run.remat: none | full (each transformer block recomputed; blocks: same)
    fused_attention: Bool = False                     # lora3.fuse_attention: T5 attention as one dot_product_attention (cuDNN on a GPU)
    inject_nonfinite_steps: Annotated[list[PositiveInt], Field(
        description="a list of optimizer steps (positive integers), e.g. [3] or []")] = []




    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("trainer.max_steps and trainer.epochs are both null: set one of them "
                             "(trainer.epochs=3 derives the steps from the training set size and trainer.batch_size)")
        return self


class EvalConfig(_Node):
    every: Optional[PositiveInt] = 100
    num_samples: NonNegInt = 64
    batch_size: PositiveInt = 32
    max_length: Optional[PositiveInt] = None
    before: Bool = True
    loss_samples: Optional[PositiveInt] = 512
    adapter: Optional[NonEmptyStr] = None


class WandbConfig(_Node):
    mode: Choice(*WANDB_MODES) = "offline"
    project: NonEmptyStr = "lora3"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = []
    log_every: PositiveInt = 10



class DistributionConfig(_Node):
    """`distribution` (lora3.run.distribution): keras.distribution on JAX."""

    mode: Choice(*DIST_MODES) = "none"
    devices: Optional[PositiveInt] = None
    mesh_shape: Optional[Annotated[list[PositiveInt], Field(
        min_length=2, max_length=2, description="[batch, model] (two positive integers) or null")]] = None
    model_size: PositiveInt = 1
    on_indivisible: Choice(*ON_INDIVISIBLE) = "replicate"
    uneven_batch: Choice(*UNEVEN_BATCH) = "pad"
    coordinator: Optional[str] = None
    num_processes: PositiveInt = 1
    process_id: NonNegInt = 0




    @model_validator(mode="after")
    def _processes(self):
        problems = []
        if self.process_id >= self.num_processes:
            problems.append(f"distribution.process_id={self.process_id} is not valid: it must be in "
                            f"[0, num_processes={self.num_processes})")
        if self.num_processes > 1 and self.mode == "none":
            problems.append("distribution.num_processes > 1 needs distribution=data_parallel or model_parallel")
        if self.num_processes > 1 and not self.coordinator:
            problems.append("distribution.num_processes > 1 needs distribution.coordinator=<host:port of process 0>")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclasses.dataclass
class RunLoraConfig(LoraConfig):
    """The `lora` node: `lora3.LoraConfig` plus two keys of the run's own.

    Args:
        init_from: an adapter directory (lora3's or PEFT's format) to start training from, instead of
            a fresh adapter; its rank, alpha and layers are the run's.
        export: `none`, or `peft` to also write the trained adapter in PEFT's format (`adapter_peft/`).
        base_quantization: `none`, `int8` or `int4`: the base model is quantized by Keras
            (`model.quantize`) after loading, before the surgery; the LoRA branch stays float.
    """

    init_from: Optional[str] = None
    export: str = "none"
    base_quantization: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise LoraConfigError(f"init_from must be an adapter directory or null, got init_from={self.init_from!r}")
        if self.export not in EXPORTS:
            raise LoraConfigError(f"export must be one of {', '.join(EXPORTS)}, got export={self.export!r}")
        if self.init_from is not None and (self.init != "kaiming" or self.dora):
            # The adapter brings its own variant (its file records init and dora): a second one here
            # would be silently ignored.
            setting = f"init={self.init!r}" if self.init != "kaiming" else "dora=true"
            raise LoraConfigError(
                f"init_from={self.init_from!r} trains on from a saved adapter, which brings its own init and "
                f"dora setting; {setting} cannot apply to it: drop lora.{setting.split('=')[0]} or lora.init_from")
        if self.base_quantization not in BASE_QUANTIZATIONS:
            raise LoraConfigError(f"base_quantization must be one of {', '.join(BASE_QUANTIZATIONS)} (Keras' "
                                  f"model.quantize modes), got base_quantization={self.base_quantization!r}")


class AppConfig(_Node):
    """The whole config of one run (`python -m lora3.run --cfg job` prints it)."""

    rank: PositiveInt = 8
    alpha: PositiveNum = 16
    targets: Targets = "qv"
    backend: Choice(*BACKENDS) = "jax"
    seed: NonNegInt = 0
    resume: Bool = False
    finetune: Choice(*FINETUNE) = "lora"
    objective: Annotated[str, Field(description='a metric path like "best/val/bleu", "final/val/loss"')] = "best/val/bleu"
    cache_dir: Optional[str] = None
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: RunLoraConfig = RunLoraConfig()   # the library's own config (+ init_from, export): it checks itself
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    wandb: WandbConfig = WandbConfig()
    distribution: DistributionConfig = DistributionConfig()

    @field_validator("lora", mode="before")
    @classmethod
    def _lora(cls, v):
        if not isinstance(v, Mapping):
            return v
        fields = [f.name for f in dataclasses.fields(RunLoraConfig)]
        for key in v:
            if key not in fields:
                raise ValueError(f"lora.{key} is not a key of the config {unknown_key_hint('lora.' + key)}")
        return RunLoraConfig(**{k: list(x) if isinstance(x, (list, tuple)) else x for k, x in v.items()})



    @field_validator("objective")
    @classmethod
    def _objective(cls, v):
        if "/" not in v or v.split("/", 1)[0] not in ("best", "final", "before"):
            raise ValueError("not a metric path")
        return v

    @model_validator(mode="after")
    def _across_groups(self):
        problems = []
        if self.eval.adapter and self.finetune != "none":
            problems.append(f"eval.adapter={self.eval.adapter!r} evaluates a saved adapter without training: "
                            "use it with lora=none (python -m lora3.run lora=none eval.adapter=<dir>)")
        if self.trainer.lora_plus_ratio is not None and self.finetune != "lora":
            problems.append(f"trainer.lora_plus_ratio={self.trainer.lora_plus_ratio} sets LoRA B's learning rate: "
                            f"it needs finetune=lora, not finetune={self.finetune}")
        for key, value in (("init_from", self.lora.init_from), ("export", self.lora.export)):
            if value not in (None, "none") and self.finetune != "lora":
                problems.append(f"lora.{key}={value!r} needs an adapter to train (finetune=lora), not "
                                f"finetune={self.finetune}" + (": to score an adapter alone use lora=none "
                                                               "eval.adapter=<dir>" if key == "init_from" else ""))
        if self.lora.base_quantization != "none" and self.finetune == "full":
            problems.append(f"lora.base_quantization={self.lora.base_quantization} freezes the quantized weights: "
                            "full fine-tuning (lora=full) cannot train them; use lora=default or base_quantization=none")
        if self.distribution.mode != "none" and self.backend != "jax":
            mode = self.distribution.mode
            problems.append(
                f"distribution={mode} needs backend=jax: lora3 distributes through keras.distribution "
                "(DeviceMesh, DataParallel, ModelParallel, LayoutMap), whose trainer support in Keras 3 is JAX only. "
                f"backend={self.backend} supports distribution=none (one device). Use backend=jax distribution={mode}")
        if self.distribution.num_processes > 1 and self.resume:
            problems.append("resume=true is not supported with distribution.num_processes > 1 yet")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------- validation and its messages


def validate(cfg) -> dict:
    """Checks a composed config against `AppConfig`; returns it as a plain resolved dict.

    Args:
        cfg: a Hydra/OmegaConf config or a plain dict (the `hydra` node, if any, is ignored).

    Returns:
        The config as plain Python containers, interpolations resolved.

    Raises:
        AppConfigError: naming every bad key, its value and what would be valid.
    """
    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise AppConfigError(f"config error{f' at {key}' if key else ''}: {str(e).splitlines()[0]}") from None
    plain.pop("hydra", None)
    missing = [k for k, v in _leaves(plain) if v == "???"]
    if missing:
        raise AppConfigError("invalid config: " + "; ".join(f"{k} is required (set {k}=...)" for k in missing))
    try:
        AppConfig.model_validate(plain)
    except ValidationError as e:
        raise AppConfigError("invalid config: " + "; ".join(_messages(e, plain))) from None
    return plain


def lora_config(plain: Mapping[str, Any]) -> LoraConfig:
    """The run's `LoraConfig` from a validated plain config (the run's own keys left out)."""
    library = {f.name for f in dataclasses.fields(LoraConfig)}
    lora = {k: v for k, v in (plain.get("lora") or {}).items() if k in library}
    return LoraConfig(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in lora.items()})


def valid_keys(path: str) -> list[str] | None:
    """The keys the schema allows under a dotted path ("" for the top level), or None if the path
    is not a node of the schema."""
    node: Any = AppConfig
    for part in filter(None, path.split(".")):
        fields = _fields(node)
        if fields is None or part not in fields:
            return None
        node = _node_type(fields[part])
    fields = _fields(node)
    return None if fields is None else sorted(fields)


def unknown_key_hint(full: str) -> str:
    """For a key the schema lacks: the valid keys at that level and the closest one ("" if the key exists)."""
    parent, _, leaf = full.lstrip("+~").rpartition(".")
    keys = valid_keys(parent)
    if keys is None or leaf in keys:
        return ""
    close = difflib.get_close_matches(leaf, keys, n=1)
    where = parent or "the top level"
    return (f"(valid keys under {where}: {', '.join(keys)}"
            + (f"; did you mean {(parent + '.') if parent else ''}{close[0]}?" if close else "") + ")")


def _fields(node) -> dict | None:
    if isinstance(node, type) and issubclass(node, BaseModel):
        return dict(node.model_fields)
    if isinstance(node, type) and dataclasses.is_dataclass(node):
        return {f.name: f for f in dataclasses.fields(node)}
    return None


def _node_type(field):
    ann = getattr(field, "annotation", None) or getattr(field, "type", None)
    for cand in (ann, *typing.get_args(ann)):
        if _fields(cand) is not None:
            return cand
        for inner in typing.get_args(cand):
            if _fields(inner) is not None:
                return inner
    return None


def _leaves(d, prefix=""):
    for k, v in (d.items() if isinstance(d, Mapping) else ()):
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def _lookup(plain, parts):
    node = plain
    for p in parts:
        if isinstance(node, Mapping) and p in node:
            node = node[p]
        else:
            return None
    return node


def _must(parts) -> str | None:
    """The `description` of the field at `parts` (what a value must be), looking through Optional."""
    node: Any = AppConfig
    field = None
    for i, part in enumerate(parts):
        fields = _fields(node)
        if fields is None or part not in fields:
            break
        field = fields[part]
        if i < len(parts) - 1:
            node = _node_type(field)
    if field is None:
        return None
    desc = getattr(field, "description", None)
    if desc is None:
        for meta in getattr(field, "metadata", ()):
            desc = getattr(meta, "description", None) or desc
        for arg in typing.get_args(getattr(field, "annotation", None)):
            for meta in getattr(arg, "__metadata__", ()):
                desc = desc or getattr(meta, "description", None)
    optional = type(None) in typing.get_args(getattr(field, "annotation", None))
    return (desc + " or null") if desc and optional and not desc.endswith("or null") else desc


def _messages(e: ValidationError, plain) -> list[str]:
    out, seen = [], set()
    for err in e.errors():
        loc = [str(p) for p in err["loc"] if isinstance(p, str)]
        # pydantic adds the union branch / type name to the location: keep the config's own keys
        parts = []
        node = AppConfig
        for p in loc:
            fields = _fields(node) if node is not None else None
            if fields is None or p not in fields:
                if err["type"] == "extra_forbidden" and fields is not None and p == loc[-1]:
                    parts.append(p)
                break
            parts.append(p)
            node = _node_type(fields[p])
        key = ".".join(parts)
        if err["type"] == "extra_forbidden":
            msg = f"{key} is not a key of the config " + (unknown_key_hint(key) or "")
        elif err["type"] == "value_error" and (not parts or _fields(_node_at(parts)) is not None):
            text = str(err.get("ctx", {}).get("error", err["msg"]))
            if parts == ["lora"] and not text.startswith("lora."):  # LoraConfig's own ("rank must be ..., got rank=0")
                text = re.sub(r"^(\w+) (must|is)", r"lora.\1 \2", re.sub(r"\b(\w+)=", r"lora.\1=", text))
                text = re.sub(r"^(\w+_pattern)\[", r"lora.\1[", text)
            msg = text
        else:
            value = _lookup(plain, parts) if parts else err.get("input")
            must = _must(parts) or err["msg"].lower()
            msg = f"{key}={value!r} is not valid: it must be {must}"
        if msg not in seen:
            seen.add(msg)
            out.append(msg.strip())
    return out


def _node_at(parts):
    node: Any = AppConfig
    for p in parts:
        fields = _fields(node)
        if fields is None or p not in fields:
            return None
        node = _node_type(fields[p])
    return node

