"""`LoraReport`: what a surgery changed, as data and as a printable table. No keras import."""

from __future__ import annotations

import dataclasses
import math

from lora3.config import LoraConfig


def count_params(variables) -> int:
    """The number of float parameters in `variables`, each variable counted once.

    Integer variables (step counters, seeds) are not parameters, except int8
    ones: Keras' quantized kernels (`quantize("int8")`; an int4 kernel is
    stored packed, two values a byte, so it counts half its values); a
    variable listed twice (shared weights) counts once.

    Args:
        variables: iterable of keras variables (anything with `shape` and `dtype`).

    Returns:
        The total number of elements, an int.

    Example:
    >>> import keras
    >>> dense = keras.layers.Dense(3)
    >>> dense.build((None, 4))
    >>> count_params(dense.weights + dense.weights)
    15
    """
    seen, total = set(), 0
    for v in variables:
        if id(v) in seen or ("float" not in str(v.dtype) and str(v.dtype) != "int8"):
            continue
        seen.add(id(v))
        total += math.prod(int(d) for d in v.shape)
    return total


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """One adapted layer: where it is, what it does, how big its adapter is.

    Args:
        path: str. The layer path (`layer.path`), the key of its adapter tensors.
        role: str or None. Its role (`q`, `down`, ...), `None` when chosen by a
            regex on a model without a role map.
        kind: str. The wrapped layer's class name, `"Dense"` or `"EinsumDense"`.
        in_features: int. Rows of the kernel's matrix view.
        out_features: int. Columns of the kernel's matrix view.
        rank: int. The adapter's rank.
        scaling: float or None. The adapter's scaling on this layer
            (`alpha / rank`, or `alpha / sqrt(rank)`); `None` when unknown.

    Example:
    >>> row = AdaptedLayer("block/query", "q", "Dense", 16, 8, rank=2, scaling=2.0)
    >>> row.lora_params
    48
    """

    path: str
    role: str | None
    kind: str
    in_features: int
    out_features: int
    rank: int
    scaling: float | None = None

    @property
    def lora_params(self) -> int:
        """`rank * (in_features + out_features)`: the sizes of A and B."""
        return self.rank * (self.in_features + self.out_features)

    @classmethod
    def from_wrapper(cls, wrapper, role=None, adapter_name=None) -> "AdaptedLayer":
        """The row of a built `lora3.layers.LoRALayer` (one of its adapters).

        Args:
            wrapper: a built `LoRALayer`.
            role: str or None. The role the surgery gave it.
            adapter_name: str or None. The adapter whose rank the row shows;
                `None` for the active one.

        Returns:
            An `AdaptedLayer`.

        Example:
        >>> import keras
        >>> from lora3.layers import LoRADense
        >>> dense = keras.layers.Dense(3, name="proj")
        >>> dense.build((None, 4))
        >>> AdaptedLayer.from_wrapper(LoRADense(dense, rank=1, alpha=1), role="o")
        AdaptedLayer(path='proj', role='o', kind='Dense', in_features=4, out_features=3, rank=1, scaling=1.0)
        """
        adapter = wrapper.get_adapter(adapter_name)
        return cls(wrapper.path, role, type(wrapper.wrapped).__name__, wrapper.in_features,
                   wrapper.out_features, adapter.rank, float(adapter.scaling))


@dataclasses.dataclass(frozen=True)
class LoraReport:
    """Adapted layers and parameter totals after `apply_lora` or `load_adapter`.

    `trainable_params` counts every weight left trainable (LoRA plus
    `train_also`); `total_params` counts every weight of the model, LoRA
    included, of every adapter (as PEFT's `print_trainable_parameters`).
    `str(report)` is the table. The rows and the config are one adapter's
    (`adapter_name`); a model with more adapters than the one `"default"`
    gets one more line naming them and the active one. When the layers'
    ranks or scalings differ (`rank_pattern` / `alpha_pattern`), the table
    has a `rank` and a `scaling` column and the totals line gives their
    ranges; with one setting for all it shows them once, in the totals line.

    Args:
        rows: tuple of `AdaptedLayer`, in path order.
        trainable_params: int. Trainable float parameters of the model.
        total_params: int. All float parameters of the model.
        config: the `LoraConfig` of the surgery, or `None` when unknown.
        adapters: tuple of str. The model's adapters, in the order added
            (empty when unknown).
        active_adapter: str or None. The adapter that runs and trains.
        adapter_name: str or None. The adapter the rows and config describe.

    Example:
    >>> rows = (AdaptedLayer("block/query", "q", "Dense", 16, 16, rank=2),
    ...         AdaptedLayer("block/value", "v", "Dense", 16, 16, rank=2))
    >>> report = LoraReport(rows, trainable_params=128, total_params=1128,
    ...                     config=LoraConfig(rank=2, alpha=4))
    >>> report.lora_params, report.base_params, round(report.percent, 2)
    (128, 1000, 11.35)
    >>> print(report)
    layer path   role  kind   in  out  LoRA params
    -----------  ----  -----  --  ---  -----------
    block/query  q     Dense  16   16           64
    block/value  v     Dense  16   16           64
    2 layers adapted (rank=2, alpha=4, scaling=2); trainable params: 128 || all params: 1,128 || trainable%: 11.3475
    >>> two = LoraReport(rows, 128, 1256, LoraConfig(rank=2, alpha=4), adapters=("default", "b"),
    ...                  active_adapter="default", adapter_name="b")
    >>> print(two.table().splitlines()[-1])
    adapters: default (active), b; rows and rank: b
    >>> mixed = LoraReport((AdaptedLayer("block/query", "q", "Dense", 16, 16, rank=4, scaling=1.0),
    ...                     AdaptedLayer("block/value", "v", "Dense", 16, 16, rank=2, scaling=2.0)),
    ...                    trainable_params=192, total_params=1192,
    ...                    config=LoraConfig(rank=2, alpha=4, rank_pattern={"query": 4}))
    >>> print(mixed)
    layer path   role  kind   in  out  rank  scaling  LoRA params
    -----------  ----  -----  --  ---  ----  -------  -----------
    block/query  q     Dense  16   16     4        1          128
    block/value  v     Dense  16   16     2        2           64
    2 layers adapted (per layer: rank 2-4, scaling 1-2); trainable params: 192 || all params: 1,192 || trainable%: 16.1074
    """

    rows: tuple
    trainable_params: int
    total_params: int
    config: LoraConfig | None = None
    adapters: tuple = ()
    active_adapter: str | None = None
    adapter_name: str | None = None

    @property
    def multi_adapter(self) -> bool:
        """Whether the model's adapters are other than the one `"default"` (the report then names them)."""
        return tuple(self.adapters) not in ((), ("default",))

    @property
    def mixed(self) -> bool:
        """Whether the rows' ranks or scalings differ (per-layer settings)."""
        return len({(r.rank, r.scaling) for r in self.rows}) > 1

    @property
    def lora_params(self) -> int:
        """LoRA parameters of all adapted layers."""
        return sum(r.lora_params for r in self.rows)

    @property
    def base_params(self) -> int:
        """Parameters of the model without its adapters: `total_params - lora_params`."""
        return self.total_params - self.lora_params

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def rank(self) -> int:
        """The surgery's rank (0 when the config is unknown)."""
        return self.config.rank if self.config else 0

    @property
    def alpha(self) -> float:
        """The surgery's alpha (0.0 when the config is unknown)."""
        return self.config.alpha if self.config else 0.0

    @property
    def scaling(self) -> float:
        """The surgery's scaling `alpha / rank` (or `alpha / sqrt(rank)`; 0.0 when unknown)."""
        return self.config.scaling if self.config else 0.0

    def to_dict(self) -> dict:
        """The report as JSON-ready data (per-layer rows and the totals).

        With adapters other than the one `"default"`, also `adapters`,
        `active_adapter` and `adapter_name`.

        Example:
        >>> LoraReport((), trainable_params=0, total_params=10).to_dict()["base_params"]
        10
        """
        return {
            "layers": [{**dataclasses.asdict(r), "lora_params": r.lora_params} for r in self.rows],
            "adapted_layers": len(self.rows),
            "lora_params": self.lora_params,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "base_params": self.base_params,
            "trainable_percent": self.percent,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            **({"adapters": list(self.adapters), "active_adapter": self.active_adapter,
                "adapter_name": self.adapter_name} if self.multi_adapter else {}),
        }

    def table(self, max_rows: int | None = None) -> str:
        """The report as a text table, one line per adapted layer, then the totals.

        Args:
            max_rows: int or None. Show at most this many layers (then a
                `... N more layers` line).

        Returns:
            The table, a str (what `str(report)` gives with every row).

        Example: see the class (`print(report)`).
        """
        mixed = self.mixed
        header = ("layer path", "role", "kind", "in", "out", *(("rank", "scaling") if mixed else ()), "LoRA params")
        rows = [
            (r.path, r.role or "-", r.kind, str(r.in_features), str(r.out_features),
             *((str(r.rank), "-" if r.scaling is None else f"{r.scaling:g}") if mixed else ()), f"{r.lora_params:,}")
            for r in self.rows
        ]
        hidden = 0
        if max_rows is not None and len(rows) > max_rows:
            hidden = len(rows) - max_rows
            rows = rows[:max_rows]
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

        def fmt(row):
            cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            return "  ".join(cells)

        lines = [fmt(header), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
        if hidden:
            lines.append(f"... {hidden} more layers")
        if mixed:
            ranks = [r.rank for r in self.rows]
            scalings = [r.scaling for r in self.rows if r.scaling is not None]

            def span(values):
                lo, hi = min(values), max(values)
                return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"

            setting = f"per layer: rank {span(ranks)}, scaling {span(scalings) if scalings else '-'}"
        else:
            setting = f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"
        lines.append(
            f"{len(self.rows)} layers adapted ({setting}); "
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {self.percent:.4f}"
        )
        if self.multi_adapter:
            names = ", ".join(f"{n} (active)" if n == self.active_adapter else n for n in self.adapters)
            lines.append(f"adapters: {names}; rows and rank: {self.adapter_name}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
