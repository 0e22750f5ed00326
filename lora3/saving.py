"""Whole-model `.keras` files of LoRA-adapted models.

keras-hub's `from_config` rebuilds plain `Dense` layers, so a `.keras` file of
an adapted model cannot be restored by the stock config alone. The surgery's
record travels as an asset: `apply_lora` leaves a `LoraState` on the model,
which keras' `model.save()` finds like any saveable attribute and whose
`save_assets` writes `assets/.../_lora3/lora3.json` (config and adapted layer
paths). `load_model` reads it, rebuilds the base model from the config,
replays the surgery (every adapter, in the order they were added, then the
active one is set) and loads every weight.
"""

from __future__ import annotations

import json
import os
import zipfile

import keras

from lora3.adapter_set import set_adapter
from lora3.config import DEFAULT_ADAPTER, LoraConfig
from lora3.errors import AdapterError
from lora3.layers.lora_layer import restoring
from lora3.surgery import STATE_ATTR, STATE_FILE, apply_lora


def load_model(path, compile=True, safe_mode=True, custom_objects=None):
    """Loads a `.keras` file saved with `model.save()`, LoRA layers included.

    Files of models without LoRA load as `keras.saving.load_model` would.

    Args:
        path: str or path. The `.keras` archive.
        compile: bool. Compile the model as it was compiled when saved.
        safe_mode: bool. Refuse lambda deserialisation, as Keras does
            (the default).
        custom_objects: dict or None. As for `keras.saving.load_model`.

    Returns:
        The model, with the LoRA layers, adapters and weights it was saved
        with, and the same adapter active.

    Raises:
        AdapterError: the file is not a `.keras` archive, or its
            `config.json` or LoRA record cannot be read.

    Example:
    >>> import os, tempfile, keras_hub, lora3
    >>> backbone = keras_hub.models.T5Backbone(vocabulary_size=64, num_layers=1, num_heads=2,
    ...                                        hidden_dim=16, intermediate_dim=32, key_value_dim=8)
    >>> _ = lora3.apply_lora(backbone, rank=2, targets="qv")
    >>> path = os.path.join(tempfile.mkdtemp(), "adapted.keras")
    >>> backbone.save(path)
    >>> loaded = lora3.load_model(path)
    >>> len(lora3.lora_layers(loaded))
    6
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise AdapterError(f"{path} is not a .keras archive")
    with zipfile.ZipFile(path) as archive:
        try:
            config = json.loads(archive.read("config.json"))
        except (KeyError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{path} has no readable config.json: {exc}") from None
        records = sorted(
            (n for n in archive.namelist()
             if n.startswith("assets/") and n.endswith(f"/{STATE_ATTR}/{STATE_FILE}")),
            key=len,
        )
        if not records:
            return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode, custom_objects=custom_objects)
        try:
            record = json.loads(archive.read(records[0]))  # the top-most: the saved model's own surgery
            # One entry per adapter, in the order they were added: replayed in that order, each
            # wrapper creates its variables in the order the file stores them.
            multi = "adapters" in record
            surgeries = []
            for entry in record["adapters"] if multi else [{"name": DEFAULT_ADAPTER, "config": record["config"]}]:
                lora_config = LoraConfig.from_dict(entry["config"])
                layer_paths = list(entry["layer_paths"] if multi else record["layer_paths"])
                surgeries.append((entry["name"], lora_config, layer_paths))
            active = record.get("active_adapter", surgeries[0][0])
            if active not in [name for name, _, _ in surgeries]:
                raise ValueError(f"active_adapter {active!r} is none of the recorded adapters")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdapterError(f"{path}: {records[0]} is not a readable lora3 record: {exc}") from None
    compile_config = config.pop("compile_config", None)
    model = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects, safe_mode=safe_mode)
    with restoring():  # the file's kernels already hold any PiSSA/OLoRA residual
        for name, lora_config, layer_paths in surgeries:
            apply_lora(model, lora_config, layer_paths=layer_paths, adapter_name=name)
    if active != surgeries[0][0]:
        set_adapter(model, active)
    model.load_weights(path)
    if compile and compile_config:
        model.compile_from_config(compile_config)
    return model
