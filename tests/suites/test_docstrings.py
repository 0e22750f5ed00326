"""The runnable examples in lora3's docstrings run, on each backend (they are the API's first docs)."""

import doctest
import importlib

import pytest

MODULES = ["lora3.layers.dense", "lora3.layers.einsum", "lora3.config", "lora3.surgery", "lora3.adapters", "lora3.saving",
           "lora3.run.completion"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (output above)"
    if name.startswith("lora3.layers"):
        assert result.attempted > 0  # the layers' examples are not all skipped
