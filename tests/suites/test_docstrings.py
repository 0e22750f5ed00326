"""The runnable examples in lora3's docstrings run, on each backend (they are the API's first docs); and no
comment or docstring points at a document outside the repository."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# every module whose source holds a doctest (lora3/ and its subpackages)
MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                 for p in (REPO / "lora3").rglob("*.py") if ">>>" in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (output above)"
    if name.startswith("lora3.layers"):
        assert result.attempted > 0  # the layers' examples are not all skipped


# Documents that live outside the repository (the project's notes, issue numbers of its tracker).
OUTSIDE = re.compile(r"\bFACTS\b|DESIGN\.md|DISTRIBUTION_NOTES|\bissue \d+|\(issue|\.\./shared/(?!data)")


@pytest.mark.one_backend
def test_no_comment_or_docstring_points_outside_the_repository():
    files = [p for d in ("lora3", "conf", "scripts", "tests", ".ci") for p in (REPO / d).rglob("*")
             if p.suffix in (".py", ".yaml", ".sh", "") and p.is_file() and "__pycache__" not in p.parts]
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if OUTSIDE.search(line) and p.name != "test_docstrings.py"]
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)
