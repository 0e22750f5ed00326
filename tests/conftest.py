"""Shared fixtures. The suite runs once per backend: KERAS_BACKEND=jax and KERAS_BACKEND=tensorflow."""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BACKEND = os.environ.setdefault("KERAS_BACKEND", "jax")  # before anything imports keras


@pytest.fixture(scope="session")
def backend_name():
    """The backend this run of the suite tests (KERAS_BACKEND, default jax)."""
    return BACKEND


@pytest.fixture(scope="session")
def lora3_cache(tmp_path_factory):
    """A per-session lora3 cache dir (tokenizers), so tests never touch ~/.cache."""
    return tmp_path_factory.mktemp("lora3_cache")


@pytest.fixture
def run_cli():
    """Runs `python -m lora3.run <args>` in the repo; KERAS_BACKEND and offline W&B passed through."""

    def run(*args, timeout=600, env=None):
        full_env = dict(os.environ, KERAS_BACKEND=BACKEND, WANDB_ERROR_REPORTING="false", HYDRA_FULL_ERROR="0")
        full_env.pop("WANDB_MODE", None)
        full_env.update(env or {})
        return subprocess.run([sys.executable, "-m", "lora3.run", *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def compose():
    """Composes the app's config through Hydra's compose API: compose(["rank=4", ...])."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module


    def make(overrides=()):
        with initialize_config_module(config_module="lora3.run.conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    return make


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.one_backend`: pure-Python behaviour that cannot differ by backend (config validation,
    file parsing, parameter counting) runs in one pass only: the JAX pass, or, when scripts/test.sh runs
    both passes at once (LORA3_SPLIT_ONE_BACKEND=1), each test in one of the two, by a hash of its id, so
    the passes take about as long and neither runs a test the other runs. Tests that share a fixture
    wider than a function (a module's benchmark run, a built wheel) go to one pass together, by a hash of
    their file, so that fixture is never built twice."""
    split = os.environ.get("LORA3_SPLIT_ONE_BACKEND") == "1"

    def shares_a_fixture(item):
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {}
        return any(d.scope in ("module", "class", "package") for chain in defs.values() for d in chain)

    def pass_of(item):
        if not split:
            return "jax"
        key = item.nodeid.split("::")[0] if shares_a_fixture(item) else item.nodeid
        return ("jax", "tensorflow")[zlib.crc32(key.encode()) % 2]

    for item in items:
        if item.get_closest_marker("one_backend") and (where := pass_of(item)) != BACKEND:
            item.add_marker(pytest.mark.skip(reason=f"backend-independent: runs in the KERAS_BACKEND={where} pass"))
