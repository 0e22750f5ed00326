"""`LoraConfig`: what to adapt and how. Plain Python, no keras import.

`LoraConfig` is also the `lora` node of the app's typed config (`lora3.run.schema`, which builds it
from the composed config and reports its errors under `lora.*`); `Any` marks a field that may be a
string or a list. `check_scale` is the one place where rank, alpha and dropout are checked (`LoraConfig` and every
LoRA layer call it), `check_init` the one place for `init`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from lora3.errors import LoraConfigError
from lora3.targets import expand as _expand_targets

INITS = ("kaiming", "gaussian", "pissa", "olora")  # and "pissa_niter_<N>" (see check_init)
# Initialisations that write a residual back into the base kernel (PiSSA, OLoRA): `base_rewriting(init)`.
BASE_REWRITING_INITS = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_([0-9]+)")
# The adapter a surgery creates unless told otherwise (PEFT's default name too). Its variables keep
# the plain names `lora_A`/`lora_B`; another adapter's are `lora_A_<name>`/`lora_B_<name>`.
DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name) -> None:
    """Checks an adapter's name: a non-empty string of letters, digits, `_` and `-`.

    The name becomes part of variable names (`lora_A_<name>`) and paths, so
    `/`, `.` and spaces are refused (PEFT refuses `.` too: its adapters are
    keys of a `torch.nn.ModuleDict`).

    Args:
        name: str. The adapter's name.

    Raises:
        LoraConfigError: quoting the bad name.

    Example:
    >>> check_adapter_name("task_a")
    >>> check_adapter_name("a/b")
    Traceback (most recent call last):
    ...
    lora3.errors.LoraConfigError: adapter name 'a/b' is not valid: use letters, digits, '_' and '-'
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise LoraConfigError(f"adapter name {name!r} is not valid: use letters, digits, '_' and '-'")


def variable_suffix(adapter_name) -> str:
    """The suffix of an adapter's variable names: `""` for `"default"`, `"_<name>"` otherwise.

    So the default adapter's variables stay `<layer.path>/lora_A` and
    `<layer.path>/lora_B` (the paths adapter files, `.keras` files and
    layout maps use), and adapter `"x"`'s are `<layer.path>/lora_A_x` and
    `<layer.path>/lora_B_x`.

    Args:
        adapter_name: str. A valid adapter name.

    Returns:
        The suffix, a str.

    Example:
    >>> "lora_A" + variable_suffix("default"), "lora_A" + variable_suffix("x")
    ('lora_A', 'lora_A_x')
    """
    return "" if adapter_name == DEFAULT_ADAPTER else f"_{adapter_name}"


def check_scale(rank, alpha, dropout) -> None:
    """Checks the numbers that set a LoRA update's size.

    The checks `LoraConfig` and every LoRA layer share: `rank` a positive
    int, `alpha` a positive finite number, `dropout` a number in `[0, 1)`.
    Booleans are refused for all three.

    Args:
        rank: int. The rank `r` of the update.
        alpha: float. The scaling numerator.
        dropout: float. The dropout rate on the LoRA branch's input.

    Raises:
        LoraConfigError: naming the first bad value.

    Example:
    >>> check_scale(8, 16.0, 0.0)
    >>> check_scale(0, 16.0, 0.0)
    Traceback (most recent call last):
    ...
    lora3.errors.LoraConfigError: rank must be a positive integer, got rank=0
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LoraConfigError(f"rank must be a positive integer, got rank={rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LoraConfigError(f"alpha must be a positive number, got alpha={alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoraConfigError(f"dropout must be a number in [0, 1), got dropout={dropout!r}")


def check_init(init) -> None:
    """Checks the name of the adapter's initialiser (one of `INITS`, or `"pissa_niter_<N>"`).

    Args:
        init: str. `"kaiming"`, `"gaussian"`, `"pissa"`, `"pissa_niter_<N>"`
            (N >= 0 subspace iterations) or `"olora"`, PEFT's
            `init_lora_weights` names (see `lora3.layers.base_init`).

    Raises:
        LoraConfigError: quoting the bad value and the valid ones.

    Example:
    >>> check_init("kaiming")
    >>> check_init("pissa_niter_4")
    >>> check_init("xavier")
    Traceback (most recent call last):
    ...
    lora3.errors.LoraConfigError: init='xavier' is not valid: it must be one of kaiming, gaussian, pissa, olora, or pissa_niter_<N> (N >= 0 iterations, e.g. pissa_niter_4)
    """
    if init not in INITS and not (isinstance(init, str) and _PISSA_NITER.fullmatch(init)):
        raise LoraConfigError(f"init={init!r} is not valid: it must be one of {', '.join(INITS)}, "
                              "or pissa_niter_<N> (N >= 0 iterations, e.g. pissa_niter_4)")


def base_rewriting(init) -> bool:
    """Whether `init` writes a residual back into the base kernel (PiSSA in any form, OLoRA).

    Example:
    >>> base_rewriting("pissa_niter_2"), base_rewriting("olora"), base_rewriting("kaiming")
    (True, True, False)
    """
    return init in BASE_REWRITING_INITS or bool(isinstance(init, str) and _PISSA_NITER.fullmatch(init))


def pissa_niter(init):
    """The subspace iterations of `"pissa_niter_<N>"` (an int), or None for any other init.

    Example:
    >>> pissa_niter("pissa_niter_4"), pissa_niter("pissa")
    (4, None)
    """
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def pattern_key(patterns, path):
    """The first key of `patterns` that matches the layer path `path`, or `None`.

    PEFT's rule for `rank_pattern` / `alpha_pattern` on module names, with
    keras' `/` in place of PEFT's `.`: a key matches when
    `re.match(rf"(.*/)?({key})$", path)` does, i.e. the key, a regex, matches
    the whole path or a tail of it that starts after a `/`. Keys are tried in
    the mapping's order and the first match wins.

    Args:
        patterns: mapping or iterable of str. The regex keys.
        path: str. A layer path (`layer.path`).

    Returns:
        The matching key, a str, or `None`.

    Example:
    >>> pattern_key({"query": 4, "decoder_block_1/.*": 2}, "decoder_block_1/attention/query")
    'query'
    >>> pattern_key({"query": 4}, "decoder_block_1/attention/key") is None
    True
    """
    for key in patterns:
        if re.match(rf"(.*/)?({key})$", path):
            return key
    return None


def scaling(rank, alpha, rslora=False) -> float:
    """The factor `s` of the update `s * A @ B`: `alpha / rank`, or `alpha / sqrt(rank)` (rsLoRA).

    Args:
        rank: int. The rank of the update.
        alpha: float. The scaling numerator.
        rslora: bool. Use rank-stabilised scaling.

    Returns:
        The scaling factor, a float.

    Example:
    >>> scaling(4, 8.0), scaling(4, 8.0, rslora=True)
    (2.0, 4.0)
    """
    return alpha / (math.sqrt(rank) if rslora else rank)


@dataclasses.dataclass
class LoraConfig:
    """LoRA hyper-parameters and the choice of layers to adapt.

    Every field is checked when the config is made (not when a field is
    assigned later): a bad value raises `LoraConfigError` naming the field
    and the value. `targets`, `layers` and `train_also` are normalised (a
    one-element `targets` list becomes its string, lists become tuples).

    Args:
        rank: int. Rank `r` of the update `A @ B` (A: in x r, B: r x out).
        alpha: float. Scaling numerator: the update is multiplied by
            `alpha / rank` (or `alpha / sqrt(rank)` with `rslora=True`).
        targets: str or list of str. Role names (`q`, `k`, `v`, `o`,
            `gate`, `up`, `down`), groups (`qv`, `attention`, `mlp`,
            `all_linear`), or regexes matched with `re.fullmatch` against
            `layer.path` (see `lora3.targets`).
        dropout: float. Dropout on the LoRA branch's input, in `[0, 1)`.
        rslora: bool. Use rank-stabilised scaling `alpha / sqrt(rank)`.
        init: str. Initialiser of A: `"kaiming"` (uniform, as PEFT) or
            `"gaussian"` (normal with std `1/rank`, as PEFT's
            `init_lora_weights="gaussian"`); B starts at zero, so a fresh
            adapter changes nothing. Or one that starts A and B from the
            base kernel and writes the residual back into it, so the
            outputs are again the base's (`lora3.layers.base_init`):
            `"pissa"` (top-r singular vectors, Meng et al. 2024,
            arXiv:2404.02948), `"pissa_niter_<N>"` (the same by a
            randomised SVD with N subspace iterations) or `"olora"`
            (the first r columns of a QR decomposition, Büyükakyüz 2024,
            arXiv:2406.01775).
        layers: `None`, int, str or a list of them. Restrict to block
            indices: an int, `"encoder"` / `"decoder"` (T5), or
            `"encoder.3"` / `"decoder.0"` for one block.
        train_also: str or list of str. Regexes (`re.search` on the
            variable path) or the shortcuts `"layer_norm"` and `"bias"`:
            these non-LoRA weights stay trainable.
        rank_pattern: dict. Regex -> rank, for the layers it matches
            (PEFT's `rank_pattern`): a key matches a layer when
            `re.match(rf"(.*/)?({key})$", layer.path)` does, so `"query"`
            names every layer whose last path component is `query` and
            `"decoder_block_1/.*"` every layer of block 1. The first key
            that matches gives the layer its rank; a layer no key matches
            gets `rank` (see `pattern_key`). Each key must match an adapted
            layer (checked by `lora3.surgery.plan`).
        alpha_pattern: dict. Regex -> alpha, matched as `rank_pattern`.
        exclude: str or list of str. Targets taken out of the selection,
            in `targets`' syntax (roles, groups, regexes fullmatched on
            `layer.path`), as PEFT's `exclude_modules`. Each entry must
            match an adaptable layer.
        dora: bool. Weight-decomposed LoRA (DoRA; Liu et al. 2024, "DoRA:
            Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353), as
            PEFT's `use_dora=True`: each adapted layer also learns a
            magnitude vector `m` `(out_features,)`, initialised to the
            per-output-feature norm of its kernel, and computes
            `(m / ||W + s*A.T@B||) * (x @ (W + s*A.T@B)) + b`, the norm
            treated as a constant in the backward pass.

    Raises:
        LoraConfigError: naming the field and the bad value (also a
            pattern key that is no valid regex, or a pattern value that is
            no valid rank / alpha).

    Example:
    >>> cfg = LoraConfig(rank=4, alpha=8, targets=["q", "v"])
    >>> cfg.scaling, cfg.targets
    (2.0, ('q', 'v'))
    >>> LoraConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> mixed = LoraConfig(rank=4, targets="all_linear", rank_pattern={"query": 8}, exclude="down")
    >>> mixed.rank_for("decoder_block_0/attention/query"), mixed.rank_for("decoder_block_0/ffw_gating")
    (8, 4)
    """

    rank: int = 8
    alpha: float = 16.0
    targets: Any = "qv"          # str or list of str
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    layers: Any = None           # None, int, str or list of them
    train_also: Any = ()         # str or list of str
    rank_pattern: dict = dataclasses.field(default_factory=dict)    # regex -> rank
    alpha_pattern: dict = dataclasses.field(default_factory=dict)   # regex -> alpha
    exclude: Any = ()            # str or list of str, as targets
    dora: bool = False

    def __post_init__(self):
        check_scale(self.rank, self.alpha, self.dropout)
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, self.alpha, self.dropout)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, self.rank, self.dropout)
        exclude = [self.exclude] if isinstance(self.exclude, str) else self.exclude or ()
        if not isinstance(exclude, (list, tuple)) or not all(isinstance(t, str) and t for t in exclude):
            raise LoraConfigError(f"exclude must be a string or a list of strings, got exclude={self.exclude!r}")
        try:
            _expand_targets(exclude)
        except LoraConfigError as exc:
            raise LoraConfigError(f"exclude: {exc}") from None
        self.exclude = tuple(exclude)
        if not isinstance(self.dora, bool):
            raise LoraConfigError(f"dora must be true or false, got dora={self.dora!r}")
        if not isinstance(self.rslora, bool):
            raise LoraConfigError(f"rslora must be true or false, got rslora={self.rslora!r}")
        check_init(self.init)
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise LoraConfigError(
                f"targets must be a non-empty string or list of strings, got targets={self.targets!r}"
            )
        self.targets = targets[0] if len(targets) == 1 else tuple(targets)
        if self.layers is not None:
            items = [self.layers] if isinstance(self.layers, (int, str)) else list(self.layers)
            for item in items:
                if isinstance(item, bool) or not isinstance(item, (int, str)):
                    raise LoraConfigError(
                        f"layers entries must be block indices or 'encoder'/'decoder'[.N], got {item!r}"
                    )
                if isinstance(item, int) and item < 0:
                    raise LoraConfigError(f"layers entries must be >= 0, got {item}")
            self.layers = tuple(items)
        train_also = [self.train_also] if isinstance(self.train_also, str) else list(self.train_also or ())
        if not all(isinstance(t, str) and t for t in train_also):
            raise LoraConfigError(
                f"train_also must be a string or a list of strings, got train_also={self.train_also!r}"
            )
        self.train_also = tuple(train_also)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @property
    def scaling(self) -> float:
        """The factor `s` of the update `s * A @ B` (see `lora3.config.scaling`)."""
        return scaling(self.rank, self.alpha, self.rslora)

    def rank_for(self, path) -> int:
        """The rank of the layer at `path`: `rank_pattern`'s first matching key's, else `rank`.

        Args:
            path: str. A layer path (`layer.path`).

        Example:
        >>> LoraConfig(rank=4, rank_pattern={"block_1/.*": 2}).rank_for("block_1/query")
        2
        """
        key = pattern_key(self.rank_pattern, path)
        return self.rank if key is None else self.rank_pattern[key]

    def alpha_for(self, path) -> float:
        """The alpha of the layer at `path`: `alpha_pattern`'s first matching key's, else `alpha`.

        Args:
            path: str. A layer path (`layer.path`).

        Example:
        >>> LoraConfig(alpha=8, alpha_pattern={"query": 2}).alpha_for("block_1/query")
        2.0
        """
        key = pattern_key(self.alpha_pattern, path)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scaling_for(self, path) -> float:
        """The scaling of the layer at `path`, from its own rank and alpha.

        Args:
            path: str. A layer path (`layer.path`).

        Example:
        >>> LoraConfig(rank=4, alpha=8, rank_pattern={"query": 2}).scaling_for("block_1/query")
        4.0
        """
        return scaling(self.rank_for(path), self.alpha_for(path), self.rslora)

    @property
    def target_list(self) -> list[str]:
        """`targets` as a list, whether it holds one entry or several."""
        return [self.targets] if isinstance(self.targets, str) else list(self.targets)

    def to_dict(self) -> dict:
        """The fields as JSON-ready data (lists, not tuples); `from_dict` reads it back.

        `rank_pattern`, `alpha_pattern` and `exclude` are left out while
        empty, and `dora` while false, so a config without per-layer
        settings or DoRA writes the same keys as before they existed.

        Example:
        >>> LoraConfig(rank=2, targets="qv", layers=[0, 1]).to_dict()["layers"]
        [0, 1]
        """
        d = dataclasses.asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["train_also"] = list(self.train_also)
        d["rank_pattern"] = dict(self.rank_pattern)
        d["alpha_pattern"] = dict(self.alpha_pattern)
        d["exclude"] = list(self.exclude)
        for key in ("rank_pattern", "alpha_pattern", "exclude", "dora"):
            if not d[key]:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        """A `LoraConfig` from `to_dict()`'s output (missing fields take their defaults).

        Args:
            d: dict. Field names to values.

        Raises:
            LoraConfigError: for a key that is not a field (naming the valid
                ones), or any value `LoraConfig` refuses.

        Example:
        >>> LoraConfig.from_dict({"rank": 4}).rank
        4
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise LoraConfigError(f"unknown LoraConfig fields {sorted(unknown)}; valid: {sorted(fields)}")
        return cls(**d)


def _check_pattern(field, pattern, other, dropout) -> dict:
    """Checks a `rank_pattern` / `alpha_pattern` mapping; returns it as a plain dict in its order."""
    if pattern is None:
        return {}
    if not isinstance(pattern, dict):
        raise LoraConfigError(f"{field} must be a mapping of regex -> value, got {field}={pattern!r}")
    out = {}
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise LoraConfigError(f"{field} keys must be non-empty regex strings, got key {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise LoraConfigError(f"{field} key {key!r} is not a valid regex: {exc}") from None
        try:
            if field == "rank_pattern":
                check_scale(value, other, dropout)
            else:
                check_scale(other, value, dropout)
        except LoraConfigError:
            what = "a positive integer" if field == "rank_pattern" else "a positive number"
            raise LoraConfigError(f"{field}[{key!r}]={value!r} is not valid: it must be {what}") from None
        out[key] = value if field == "rank_pattern" else float(value)
    return out
