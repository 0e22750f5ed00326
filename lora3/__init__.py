"""lora3: LoRA for Keras 3 / keras-hub models, written in `keras.ops` only.

Importing `lora3` does not import keras, on purpose: Keras reads `KERAS_BACKEND` once, when it is
first imported, so a library that imported keras here would fix the backend before its user (or
the app's `backend=` option) could choose it. The names that need keras are therefore resolved
on first access (PEP 562 `__getattr__` below); `LoraConfig` and the errors are plain Python.

    import os; os.environ["KERAS_BACKEND"] = "jax"
    import keras_hub, lora3
    model = keras_hub.models.T5Seq2SeqLM.from_preset("flan_base_multi")
    report = lora3.apply_lora(model, lora3.LoraConfig(rank=8, alpha=16, targets="qv"))
    print(report)
    model.compile(...); model.fit(...)
    lora3.save_adapter(model, "adapter/")

Several named adapters on one model, as PEFT: `apply_lora(..., adapter_name="b")` or
`load_adapter(..., adapter_name="b")` adds one; `set_adapter(model, "b")` makes it the one that
runs and trains; `with disable_adapters(model):` runs the base model; `delete_adapter`,
`add_weighted_adapter` (see `lora3.adapter_set`).
"""

import importlib

from lora3.config import LoraConfig
from lora3.errors import AdapterError, LoraConfigError, Lora3Error

__version__ = "0.1.0"

# Public names that need keras: the module each one lives in, imported on first access.
_LAZY = {
    "apply_lora": "lora3.surgery",
    "find_targets": "lora3.surgery",
    "lora_layers": "lora3.surgery",
    "unload": "lora3.surgery",
    "LoraReport": "lora3.report",
    "LoRALayer": "lora3.layers",
    "LoRADense": "lora3.layers",
    "LoRAEinsumDense": "lora3.layers",
    "save_adapter": "lora3.adapters",
    "load_adapter": "lora3.adapters",
    "merge_and_unload": "lora3.adapters",
    "base_fingerprint": "lora3.adapters",
    "load_model": "lora3.saving",
    "save_peft_adapter": "lora3.peft_format",
    "load_peft_adapter": "lora3.peft_format",
    "is_peft_adapter": "lora3.peft_format",
    "set_adapter": "lora3.adapter_set",
    "disable_adapters": "lora3.adapter_set",
    "delete_adapter": "lora3.adapter_set",
    "active_adapter": "lora3.adapter_set",
    "adapter_names": "lora3.adapter_set",
    "add_weighted_adapter": "lora3.adapter_set",
    "fuse_attention": "lora3.fused_attention",
}

__all__ = ["LoraConfig", "AdapterError", "LoraConfigError", "Lora3Error", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora3' has no attribute {name!r}")
