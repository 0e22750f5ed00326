"""Exceptions lora3 raises. All are `ValueError`s, so callers that already catch
`ValueError` for bad arguments keep working."""


class Lora3Error(ValueError):
    """Base class of every error lora3 raises on purpose."""


class LoraConfigError(Lora3Error):
    """A LoRA setting (rank, alpha, targets, ...) is invalid for this model."""


class AdapterError(Lora3Error):
    """An adapter directory cannot be loaded onto this model (mismatch or corrupt file)."""
