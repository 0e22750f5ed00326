"""LoRA wrapper layers, written in `keras.ops` only."""

from lora3.layers.base import LoRALayer
from lora3.layers.dense import LoRADense
from lora3.layers.einsum import LoRAEinsumDense

__all__ = ["LoRALayer", "LoRADense", "LoRAEinsumDense"]
