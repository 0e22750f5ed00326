"""`LoraConfig`: what to adapt and how. Plain Python, no keras import.

`LoraConfig` is also the `lora` node of the app's typed config (`lora3.run.schema`): its field
types are ones OmegaConf can check (`Any` where a value may be a string or a list), and
`__post_init__` is the one place where rank, alpha and dropout are checked
(`check_scale`, which the layers call too).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lora3.errors import LoraConfigError

INITS = ("kaiming", "gaussian")



def check_scale(rank, alpha, dropout) -> None:
    """Raises `LoraConfigError` unless rank is a positive int, alpha a positive finite number and
    dropout a number in [0, 1): the checks `LoraConfig` and every LoRA layer share."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LoraConfigError(f"rank must be a positive integer, got rank={rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraConfigError(f"alpha must be a positive number, got alpha={alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoraConfigError(f"dropout must be a number in [0, 1), got dropout={dropout!r}")


@dataclasses.dataclass
class LoraConfig:
    """LoRA hyper-parameters and the choice of layers to adapt.

    Args:
        rank: rank `r` of the update `A @ B` (A: in x r, B: r x out).
        alpha: scaling numerator: the update is multiplied by `alpha / rank`
            (or `alpha / sqrt(rank)` with `rslora=True`).
        targets: role names (`q`, `k`, `v`, `o`, `gate`, `up`, `down`), groups
            (`qv`, `attention`, `mlp`, `all_linear`), a regex matched with
            `re.fullmatch` against `layer.path`, or a list of these.
        dropout: dropout on the LoRA branch's input, in [0, 1).
        rslora: use rank-stabilised scaling `alpha / sqrt(rank)`.
        init: initialiser of A, `"kaiming"` (uniform, as PEFT) or `"gaussian"`
            (normal with std `1/rank`, as PEFT's `init_lora_weights="gaussian"`).
            B always starts at zero, so a fresh adapter changes nothing.
        layers: restrict to block indices: an int or a list of ints, `"encoder"`
            / `"decoder"` (T5), or `"encoder.3"` / `"decoder.0"` for one block.
        train_also: regexes (`re.search` on the variable path) or the shortcuts
            `"layer_norm"` and `"bias"`: these non-LoRA weights stay trainable.

    Example:
    >>> cfg = LoraConfig(rank=4, alpha=8, targets=["q", "v"])
    >>> cfg.scaling
    2.0
    """

    rank: int = 8
    alpha: float = 16.0
    targets: Any = "qv"          # str or list of str
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    layers: Any = None           # None, int, str or list of them
    train_also: Any = ()         # str or list of str

    def __post_init__(self):
        check_scale(self.rank, self.alpha, self.dropout)
        if not isinstance(self.rslora, bool):
            raise LoraConfigError(f"rslora must be true or false, got rslora={self.rslora!r}")
        if self.init not in INITS:
            raise LoraConfigError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        targets = self.targets
        if isinstance(targets, str):
            targets = [targets]
        targets = list(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise LoraConfigError(
                f"targets must be a non-empty string or list of strings, got targets={self.targets!r}"
            )
        object.__setattr__(self, "targets", targets[0] if len(targets) == 1 else tuple(targets))
        layers = self.layers
        if layers is not None:
            items = [layers] if isinstance(layers, (int, str)) else list(layers)
            for item in items:
                if isinstance(item, bool) or not isinstance(item, (int, str)):
                    raise LoraConfigError(
                        f"layers entries must be block indices or 'encoder'/'decoder'[.N], got {item!r}"
                    )
                if isinstance(item, int) and item < 0:
                    raise LoraConfigError(f"layers entries must be >= 0, got {item}")
            object.__setattr__(self, "layers", tuple(items))
        train_also = self.train_also
        if isinstance(train_also, str):
            train_also = [train_also]
        object.__setattr__(self, "train_also", tuple(train_also or ()))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def target_list(self) -> list[str]:
        return [self.targets] if isinstance(self.targets, str) else list(self.targets)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["train_also"] = list(self.train_also)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise LoraConfigError(f"unknown LoraConfig fields {sorted(unknown)}; valid: {sorted(fields)}")
        return cls(**d)
