"""LoRA wrapper layers, written in `keras.ops` only.

`LoRALayer` (`lora_layer.py`) is the shared base; `LoRADense` (`lora_dense.py`) and
`LoRAEinsumDense` (`lora_einsum_dense.py`) wrap `keras.layers.Dense` and
`keras.layers.EinsumDense`. `low_rank.py` holds their two rank-r products, with gradients written
for speed under XLA.
"""

from lora3.layers.lora_dense import LoRADense
from lora3.layers.lora_einsum_dense import LoRAEinsumDense, analyze_equation
from lora3.layers.lora_layer import AdapterWeights, LoRALayer

__all__ = ["LoRALayer", "LoRADense", "LoRAEinsumDense", "AdapterWeights", "analyze_equation"]
