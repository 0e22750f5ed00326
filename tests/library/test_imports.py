"""The library needs keras, numpy and safetensors alone: none of the app's packages (Hydra,
OmegaConf, W&B, datasets, sacrebleu, matplotlib, filelock) nor keras-hub, whose import is left to
the functions that name a model family. Checked in a fresh interpreter where those imports fail,
and in the source (a function-level import would only fail when that function runs)."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import lora3

LIBRARY = pathlib.Path(lora3.__file__).parent
APP_PACKAGES = ("hydra", "omegaconf", "wandb", "datasets", "sacrebleu", "matplotlib", "filelock")
BLOCKED = APP_PACKAGES + ("keras_hub",)
# The function-level imports the library keeps, each with its reason in a comment beside it.
ALLOWED_LOCAL_IMPORTS = {
    ("param_table.py", "build_backbone", "keras_hub"),  # a model family is named
    ("sharding.py", "layout_map", "keras"),  # the app checks distribution settings before the backend is chosen
    ("sharding.py", "model_parallel_class", "keras"),
}


def library_files():
    """lora3/*.py and lora3/layers/: the library (lora3/run and lora3/bench are the app and the benchmark)."""
    return sorted(LIBRARY.glob("*.py")) + sorted((LIBRARY / "layers").rglob("*.py"))


def imported_modules(tree):
    """`(function name or None, top-level module)` for every import statement in `tree`."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name if function is None else function)
                continue
            if isinstance(child, ast.Import):
                found.extend((function, alias.name.split(".")[0]) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((function, child.module.split(".")[0]))
            visit(child, function)

    visit(tree, None)
    return found


SCRIPT = textwrap.dedent(
    """
    import importlib, os, pkgutil, sys, tempfile

    BLOCKED = {blocked!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the library must not need it")
            return None

    sys.meta_path.insert(0, Blocker())

    import lora3
    import lora3.layers

    modules = []
    for package in (lora3, lora3.layers):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name not in ("lora3.run", "lora3.bench", "lora3.layers"):
                modules.append(info.name)
    for name in modules:
        importlib.import_module(name)
    for name in lora3.__all__:
        getattr(lora3, name)

    import keras
    import numpy as np
    from keras import ops

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.up = keras.layers.Dense(8, activation="relu", name="up")
            self.heads = keras.layers.EinsumDense("bd,dnh->bnh", output_shape=(2, 4), name="heads")

        def call(self, x):
            return ops.reshape(self.heads(self.up(x)), (-1, 8))

    def make():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,), name="x")  # every name given: the same fingerprint twice
        outputs = keras.layers.Dense(3, name="head")(Block(name="block")(inputs))
        return keras.Model(inputs, outputs, name="net")

    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    model = make()
    base = ops.convert_to_numpy(model(x))
    report = lora3.apply_lora(model, lora3.LoraConfig(rank=2, alpha=4, targets=r"block/.*"))
    assert [r.kind for r in report.rows] == ["EinsumDense", "Dense"], report.rows
    for w in lora3.lora_layers(model):
        w.lora_B.assign(np.full(w.lora_B.shape, 0.1, "float32"))
    adapted = ops.convert_to_numpy(model(x))
    assert not np.allclose(adapted, base)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((4, 3), "float32"), epochs=1, verbose=0)
    adapted = ops.convert_to_numpy(model(x))

    out = tempfile.mkdtemp()
    lora3.save_adapter(model, os.path.join(out, "adapter"))
    fresh = make()
    lora3.load_adapter(fresh, os.path.join(out, "adapter"))
    np.testing.assert_allclose(ops.convert_to_numpy(fresh(x)), adapted, rtol=1e-5, atol=1e-5)

    model.save(os.path.join(out, "m.keras"))
    loaded = lora3.load_model(os.path.join(out, "m.keras"), custom_objects={{"Block": Block}})
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x)), adapted, rtol=1e-5, atol=1e-5)

    merged = lora3.merge_and_unload(fresh)
    assert not lora3.lora_layers(merged)
    np.testing.assert_allclose(ops.convert_to_numpy(merged(x)), adapted, rtol=1e-5, atol=1e-5)

    loaded_blocked = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    assert not loaded_blocked, loaded_blocked
    print("ok", len(modules), "modules")
    """
)


def test_library_runs_without_the_apps_packages(tmp_path, backend_name):
    env = dict(os.environ, KERAS_BACKEND=backend_name)
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok")


@pytest.mark.one_backend
def test_the_blocker_does_block(tmp_path):
    """The check above would notice: a library module importing a blocked package fails there."""
    script = SCRIPT.split("import lora3\n")[0] + "import omegaconf\n"
    proc = subprocess.run([sys.executable, "-c", script.format(blocked=BLOCKED)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "omegaconf is blocked" in proc.stderr


@pytest.mark.one_backend
def test_no_app_package_is_imported_anywhere_in_the_library_source():
    offenders = [f"{path.relative_to(LIBRARY)}: {module} (in {function or 'module'})"
                 for path in library_files()
                 for function, module in imported_modules(ast.parse(path.read_text(encoding="utf-8")))
                 if module in APP_PACKAGES]
    assert not offenders


@pytest.mark.one_backend
def test_function_level_imports_are_only_the_documented_ones():
    found = {(str(path.relative_to(LIBRARY)), function, module)
             for path in library_files()
             for function, module in imported_modules(ast.parse(path.read_text(encoding="utf-8")))
             if function is not None}
    assert found == ALLOWED_LOCAL_IMPORTS
