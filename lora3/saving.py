"""Whole-model `.keras` files of LoRA-adapted models.

keras-hub's `from_config` rebuilds plain `Dense` layers, so a `.keras` file of
an adapted model cannot be restored by the stock config alone. `apply_lora`
records the surgery in the model's config (key `"lora3"`); `load_model` reads
it, rebuilds the base model, replays the surgery and loads every weight.
"""

from __future__ import annotations

import json
import os
import zipfile

from lora3.errors import AdapterError


def load_model(path, compile=True, safe_mode=True, custom_objects=None):
    """Load a `.keras` file saved with `model.save()` from a lora3-adapted model.

    Files of models without LoRA load as `keras.saving.load_model` would.
    `safe_mode=True` (the default) refuses lambda deserialisation, as Keras does.

    Example:
    >>> model.save("adapted.keras")                     # doctest: +SKIP
    >>> model = lora3.load_model("adapted.keras")       # doctest: +SKIP
    """
    import keras

    from lora3.config import LoraConfig
    from lora3.surgery import apply_lora

    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise AdapterError(f"{path} is not a .keras archive")
    with zipfile.ZipFile(path) as archive:
        try:
            config = json.loads(archive.read("config.json"))
        except (KeyError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{path} has no readable config.json: {exc}") from None
    record = config.get("config", {}).pop("lora3", None)
    if record is None:
        return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode, custom_objects=custom_objects)
    compile_config = config.pop("compile_config", None)
    model = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects, safe_mode=safe_mode)
    apply_lora(model, LoraConfig.from_dict(record["config"]), layer_paths=record["layer_paths"])
    model.load_weights(path)
    if compile and compile_config:
        model.compile_from_config(compile_config)
    return model
