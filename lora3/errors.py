"""Exceptions lora3 raises. All are `ValueError`s, so callers that already catch
`ValueError` for bad arguments keep working."""


class Lora3Error(ValueError):
    """Base class of every error lora3 raises on purpose.

    Example:
    >>> import lora3
    >>> try:
    ...     lora3.LoraConfig(rank=0)
    ... except lora3.Lora3Error as exc:
    ...     print(type(exc).__name__)
    LoraConfigError
    """


class LoraConfigError(Lora3Error):
    """A LoRA setting (rank, alpha, targets, ...) is invalid for this model.

    Raised before the model is changed: a refused `apply_lora` leaves it as it was.

    Example:
    >>> import lora3
    >>> lora3.LoraConfig(alpha=-1)
    Traceback (most recent call last):
    ...
    lora3.errors.LoraConfigError: alpha must be a positive number, got alpha=-1
    """


class AdapterError(Lora3Error):
    """An adapter directory cannot be saved or loaded (mismatch or corrupt file).

    Raised before the model is changed: a refused `load_adapter` leaves it as it was.

    Example:
    >>> from lora3.adapters import read_adapter_config
    >>> read_adapter_config("no/such/dir")
    Traceback (most recent call last):
    ...
    lora3.errors.AdapterError: adapter directory 'no/such/dir' does not exist
    """
