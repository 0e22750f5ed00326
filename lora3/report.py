"""`LoraReport`: what a surgery changed, as data and as a printable table."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    path: str
    role: str | None
    kind: str  # "Dense" or "EinsumDense"
    in_features: int
    out_features: int
    lora_params: int


@dataclasses.dataclass(frozen=True)
class LoraReport:
    """Adapted layers and parameter totals after `apply_lora`.

    `trainable_params` counts every weight left trainable (LoRA plus
    `train_also`); `total_params` counts every weight of the model, LoRA
    included (as PEFT's `print_trainable_parameters`).
    """

    rows: tuple
    trainable_params: int
    total_params: int
    base_params: int
    rank: int
    alpha: float
    scaling: float

    @property
    def lora_params(self) -> int:
        return sum(r.lora_params for r in self.rows)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict:
        return {
            "layers": [dataclasses.asdict(r) for r in self.rows],
            "adapted_layers": len(self.rows),
            "lora_params": self.lora_params,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "base_params": self.base_params,
            "trainable_percent": self.percent,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
        }

    def table(self, max_rows: int | None = None) -> str:
        header = ("layer path", "role", "kind", "in", "out", "LoRA params")
        rows = [
            (r.path, r.role or "-", r.kind, str(r.in_features), str(r.out_features), f"{r.lora_params:,}")
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
        lines.append(
            f"{len(self.rows)} layers adapted (rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}); "
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {self.percent:.4f}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
