"""The wheel: what it holds, and the app run from it, installed (not editable) into a fresh virtual
environment and started from an empty directory: one run, `--cfg job`, `--help`, and a multirun of a
user's experiment from their own config directory (`--config-dir`, Hydra's search path).

The wheel is built from a copy of the sources pyproject.toml packages (pyproject.toml, README.md,
lora3/, conf/), so that nothing left in the checkout's build/ can end up in it. The virtual
environment sees this interpreter's site-packages (`--system-site-packages`) for the dependencies;
only lora3 itself is installed into it (`pip install --no-deps`).
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[2]
BACKEND = os.environ.get("KERAS_BACKEND", "jax")
SMOKE = ["experiment=smoke", f"backend={BACKEND}", "trainer.max_steps=2", "model.base=null"]  # ~20 s a job


def _packages_on_disk() -> set[str]:
    """Every directory of lora3/ holding an __init__.py, as a dotted package name."""
    return {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "lora3").rglob("__init__.py")}


def _configs_on_disk() -> list[str]:
    return sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))


@pytest.mark.one_backend
def test_pyproject_packages_name_every_package_of_lora3():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(tool["packages"]) - {"lora3.run.conf"} == _packages_on_disk()
    assert tool["package-dir"] == {"lora3.run.conf": "conf"} and (REPO / "conf" / "__init__.py").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("lora3", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("lora3-*.whl")
    return whl


@pytest.mark.one_backend
def test_wheel_holds_every_module_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "lora3").rglob("*.py"))
    assert [m for m in modules if m not in names] == []
    assert [c for c in _configs_on_disk() if f"lora3/run/conf/{c}" not in names] == []
    assert "lora3/run/conf/__init__.py" in names and "lora3/run/conf/config.yaml" in names
    assert not [n for n in names if n.startswith(("conf/", "tests/", "scripts/", "experiments/"))]


@pytest.fixture(scope="module")
def app(wheel, tmp_path_factory):
    """Runs `python -m lora3.run <args>` with the installed wheel, from an empty directory."""
    tmp = tmp_path_factory.mktemp("installed")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # this interpreter is itself a venv: --system-site-packages would skip it
        purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        outer = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
        Path(purelib, "_outer_env.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_MODE")}
    env.update(KERAS_BACKEND=BACKEND, WANDB_ERROR_REPORTING="false", HYDRA_FULL_ERROR="0",
               LORA3_CACHE=str(tmp / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    # pip from the site-packages the venv sees; --ignore-installed: leave this environment's lora3 alone
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                        str(wheel)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    empty = tmp / "empty"
    empty.mkdir()

    def run(*args, timeout=600):
        return subprocess.run([str(py), *args], cwd=empty, env=env, capture_output=True, text=True, timeout=timeout)

    run.venv, run.cwd, run.tmp = venv, empty, tmp
    return run


def test_installed_package_is_the_wheel_not_the_checkout(app):
    r = app("-c", "import importlib.resources as r, lora3, lora3.run; "
                  "print(lora3.__file__); print(r.files('lora3.run.conf').joinpath('config.yaml').is_file())")
    assert r.returncode == 0, r.stderr[-3000:]
    where, has_config = r.stdout.split()
    assert Path(where).is_relative_to(app.venv) and not Path(where).is_relative_to(REPO), where
    assert has_config == "True"


@pytest.mark.slow
def test_installed_app_runs_from_an_empty_directory(app):
    out = app.tmp / "run"
    r = app("-m", "lora3.run", *SMOKE, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["backend"] == BACKEND
    assert list(app.cwd.iterdir()) == []  # nothing written where it was started

    r = app("-m", "lora3.run", "--cfg", "job", "experiment=smoke", "rank=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank: 4" in r.stdout and "model:" in r.stdout and "trainer:" in r.stdout

    r = app("-m", "lora3.run", "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    groups = r.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    for group in ("data: ", "experiment: ", "lora: ", "model: ", "trainer: ", "hparams_search: "):
        assert group in groups, r.stdout
    assert "smoke" in groups and "multi30k" in groups


@pytest.mark.slow
@pytest.mark.one_backend  # Hydra's sweep and search path: the smoke run above covers each backend
def test_installed_app_multirun_with_a_users_config_dir(app):
    """A 2-job multirun of a user's experiment (from --config-dir) built on the packaged experiment/smoke."""
    conf = app.tmp / "myconf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n# a user's experiment on top of the packaged one\n"
        "defaults:\n  - smoke\n\nseed: 7\n")
    sweep = app.tmp / "sweep"
    r = app("-m", "lora3.run", "--config-dir", str(conf), "-m", "experiment=mine", "rank=2,4", *SMOKE[1:],
            f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(json.loads((sweep / str(i) / "metrics.json").read_text())["status"] == "finished" for i in (0, 1))
    cfgs = [_config(sweep / str(i)) for i in (0, 1)]
    assert [c["rank"] for c in cfgs] == [2, 4] and {c["seed"] for c in cfgs} == {7}  # the sweep, and mine.yaml
    assert {c["trainer"]["batch_size"] for c in cfgs} == {8}  # experiment/smoke, from the package, under mine
    assert (sweep / "sweep_summary.json").is_file() and list(app.cwd.iterdir()) == []


def _config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())
