"""Translation data for the experiment app: (source, target) pairs, no keras import.

    from lora3.run.data import load
    data = load({"source": "synthetic", "train_size": 4000, ...}, seed=0)
    data.train_inputs()   # sources with the T5 task prefix
    data.train_targets()

Sources (`data.source`): `synthetic` (project-generated, offline), `files` (a directory with
`<split>.jsonl` or `<split>.de`/`<split>.en`, e.g. Multi30K), `jsonl` (one file, HF translation
schema), `wmt16` (`datasets.load_dataset("wmt16", "de-en")`).

Relative paths resolve against the working directory (the directory the app was run from: it does
not chdir), never against the package's location. `data.name=multi30k` (conf/data/multi30k.yaml)
with no copy at `data.path` downloads the official files once (`OFFICIAL`, sha256-checked).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import random
import re
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from lora3.fileio import sha256_file, staged_dir
from lora3.run.cache import default_cache_dir
from lora3.run.data import synthetic
from lora3.run.data.readers import DataError, read_jsonl, read_split

__all__ = ["DataError", "TranslationData", "load", "resolve_path", "DIRECTIONS", "SOURCES", "OFFICIAL",
           "parse_split", "slice_rows", "unreachable"]

log = logging.getLogger("lora3")
DIRECTIONS = ("de-en", "en-de")
SOURCES = ("synthetic", "files", "jsonl", "wmt16")
OVERLONG = ("truncate", "drop", "error")
PREFIXES = {"de-en": "translate German to English: ", "en-de": "translate English to German: "}

# `data.source=files` datasets with public official files, by `data.name`: used where `data.path` holds no
# copy. Pinned to a commit and to the sha256 of each decompressed file: the same bytes as the copy in
# ../shared/data/multi30k (see its README), so runs on either get the same data fingerprint.
_MULTI30K_REV = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
OFFICIAL = {
    "multi30k": {
        "title": "Multi30K de-en (WMT16 multimodal task 1, github.com/multi30k/dataset)",
        "url": f"https://raw.githubusercontent.com/multi30k/dataset/{_MULTI30K_REV}/data/task1/raw/",
        "cache": f"multi30k-{_MULTI30K_REV[:7]}",
        "files": {  # local name: (file under url, sha256 of the decompressed text)
            "train.de": ("train.de.gz", "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72"),
            "train.en": ("train.en.gz", "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6"),
            "valid.de": ("val.de.gz", "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660"),
            "valid.en": ("val.en.gz", "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
        },
    },
}


@dataclasses.dataclass
class TranslationData:
    train: list[dict]   # {"de": ..., "en": ...}
    valid: list[dict]
    direction: str
    prefix: str
    info: dict
    test: list[dict] = dataclasses.field(default_factory=list)  # held-out test split (data.test_split), if any

    @property
    def src_lang(self) -> str:
        return self.direction.split("-")[0]

    @property
    def tgt_lang(self) -> str:
        return self.direction.split("-")[1]

    def sources(self, split: str) -> list[str]:
        return [p[self.src_lang] for p in getattr(self, split)]

    def inputs(self, split: str) -> list[str]:
        """Model inputs: the source sentence with the task prefix."""
        return [self.prefix + s for s in self.sources(split)]

    def targets(self, split: str) -> list[str]:
        return [p[self.tgt_lang] for p in getattr(self, split)]

    def tokenizer_texts(self) -> list[str]:
        """Text a tokenizer is trained on: training sources (with prefix) and targets."""
        return self.inputs("train") + self.targets("train")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in ("train", "valid", "test") if self.test else ("train", "valid"):
            for p in getattr(self, split):
                h.update(json.dumps(p, ensure_ascii=False, sort_keys=True).encode())
        return h.hexdigest()[:16]


def resolve_path(path: str | os.PathLike, *, what: str = "data.path") -> Path:
    """Absolute paths as given; relative ones against the working directory (where the app was run)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = (Path.cwd() / p).resolve()
    if not p.exists():
        raise DataError(f"{what}={path} not found (looked in {p}; a relative path resolves against the "
                        f"directory you run from); pass the path to a local copy: {what}=/path/to/data")
    return p


def _fetch_official(name: str, path: str) -> Path:
    """The official files of dataset `name` (`OFFICIAL`), downloaded once into the lora3 cache."""
    spec = OFFICIAL[name]
    target = default_cache_dir() / "data" / spec["cache"]
    if all((target / f).is_file() for f in spec["files"]):
        return target
    p = Path(os.path.expanduser(str(path)))
    tried = p if p.is_absolute() else (Path.cwd() / p).resolve()
    fail = (f"data.path={path} not found (looked in {tried}; a relative path resolves against the directory "
            f"you run from), and the official {spec['title']} files cannot be downloaded from {spec['url']}")
    fix = ("Pass a local copy: data.path=<dir> (a directory with <split>.jsonl, or <split>.de and <split>.en, "
           "for the splits train and valid)")
    host = urllib.parse.urlparse(spec["url"]).hostname
    if not can_reach(host):
        raise DataError(f"{fail}: {host} is not reachable (offline?). {fix}")
    log.warning("data.path=%s not found (looked in %s): downloading the official %s files from %s into %s",
                path, tried, spec["title"], spec["url"], target)
    with staged_dir(target) as tmp:
        for local, (remote, sha256) in spec["files"].items():
            url = spec["url"] + remote
            try:
                with urllib.request.urlopen(url, timeout=60) as r:
                    text = gzip.decompress(r.read())
            except (OSError, EOFError) as e:  # URLError, timeouts, a truncated or non-gzip body
                raise DataError(f"{fail}: {url}: {e}. {fix}") from None
            if hashlib.sha256(text).hexdigest() != sha256:
                raise DataError(f"{fail}: {url} does not hold the pinned file (sha256 differs). {fix}")
            Path(tmp, local).write_bytes(text)
    return target


_SPLIT = re.compile(r"^([^\[\]]+?)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$")


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """`"train[:1%]"` -> ("train", None, "1%"); `"valid"` -> ("valid", None, None).

    The Hugging Face `datasets` slice syntax: `name[start:stop]`, each bound a row count or a
    percentage of the split (`train[:1000]`, `train[10%:20%]`, `train[-500:]`).
    """
    m = _SPLIT.match(str(spec).strip())
    if not m:
        raise DataError(f"split {spec!r} is not valid: use a split name, optionally sliced like train[:1%] or train[:1000]")
    return m.group(1), m.group(2), m.group(3)


def slice_rows(rows: list, start: str | None, stop: str | None) -> list:
    """Applies a `parse_split` slice; percentages round to the closest row, as `datasets` does."""
    def bound(v):
        if v is None:
            return None
        if v.endswith("%"):
            return int(round(float(v[:-1]) * len(rows) / 100.0))
        return int(v)

    return rows[bound(start):bound(stop)]


def _read_sliced(directory: Path, spec: str, fmt: str) -> list[dict]:
    name, start, stop = parse_split(spec)
    return slice_rows(read_split(directory, name, fmt), start, stop)


def _get(cfg: Mapping[str, Any], key: str, default=None):
    try:
        value = cfg.get(key, default)
    except Exception:  # omegaconf struct mode on missing keys
        value = default
    return default if value is None else value


def load(cfg: Mapping[str, Any], seed: int = 0) -> TranslationData:
    """Loads the splits named by `cfg` (a data config: see conf/data/*.yaml)."""
    source = _get(cfg, "source", "synthetic")
    direction = _get(cfg, "direction", "de-en")
    if direction not in DIRECTIONS:
        raise DataError(f"data.direction={direction!r} is not valid; valid: {', '.join(DIRECTIONS)}")
    info: dict = {"source": source, "name": _get(cfg, "name", source)}
    test: list[dict] = []
    if source == "synthetic":
        variant = _get(cfg, "variant", "all")
        if variant not in synthetic.VARIANTS:
            raise DataError(f"data.variant={variant!r} is not valid; valid: {', '.join(synthetic.VARIANTS)}")
        train, valid = synthetic.generate(
            int(_get(cfg, "train_size", 4000)), int(_get(cfg, "valid_size", 300)), seed=seed, variant=variant
        )
        info.update(variant=variant, generator_version=synthetic.GENERATOR_VERSION, seed=seed)
    elif source == "files":
        path = _get(cfg, "path")
        if not path:
            raise DataError("data.path is required for data source 'files' (a directory)")
        try:
            directory = resolve_path(path, what="data.path")
        except DataError:
            if info["name"] not in OFFICIAL:
                raise
            directory = _fetch_official(info["name"], path)
            info["url"] = OFFICIAL[info["name"]]["url"]
        fmt = _get(cfg, "format", "auto")
        train = _read_sliced(directory, _get(cfg, "train_split", "train"), fmt)
        valid = _read_sliced(directory, _get(cfg, "valid_split", "valid"), fmt)
        test = _read_sliced(directory, _get(cfg, "test_split"), fmt) if _get(cfg, "test_split") else []
        info.update(path=str(directory), files_sha256=_hash_files(directory))
    elif source == "jsonl":
        path = _get(cfg, "path")
        if not path or path == "???":
            raise DataError("data=jsonl needs data.path=<file.jsonl> (HF translation schema)")
        train_path = resolve_path(path, what="data.path")
        train = read_jsonl(train_path)
        valid_path = _get(cfg, "valid_path")
        files = [train_path]
        if valid_path:
            vp = resolve_path(valid_path, what="data.valid_path")
            valid = read_jsonl(vp)
            files.append(vp)
        else:
            fraction = float(_get(cfg, "valid_fraction", 0.05))
            if not 0.0 < fraction < 1.0:
                raise DataError(f"data.valid_fraction={fraction} is not valid; it must be in (0, 1)")
            if len(train) < 2:
                raise DataError(f"{train_path}: {len(train)} pair(s); at least 2 are needed to hold out validation")
            rng = random.Random(seed)
            order = list(range(len(train)))
            rng.shuffle(order)
            n_valid = max(1, int(round(fraction * len(train))))
            held = set(order[:n_valid])
            valid = [p for i, p in enumerate(train) if i in held]
            train = [p for i, p in enumerate(train) if i not in held]
        info.update(path=str(train_path), files_sha256={str(f): sha256_file(f) for f in files})
    elif source == "wmt16":
        train, valid, test = _load_wmt16(cfg)
        info.update(hf_dataset="wmt16", hf_config="de-en",
                    splits={k: _get(cfg, k) for k in ("train_split", "valid_split", "test_split")})
    else:
        raise DataError(f"data.source={source!r} is not valid; valid: {', '.join(SOURCES)}")

    max_train, max_valid = _get(cfg, "max_train"), _get(cfg, "max_valid")
    if max_train is not None:
        train = train[: int(max_train)]
    if max_valid is not None:
        valid = valid[: int(max_valid)]
    where = info.get("path", source)
    if len(train) < 2:
        raise DataError(f"{where}: the training split has {len(train)} pair(s); at least 2 are needed")
    if len(valid) < 1:
        raise DataError(f"{where}: the validation split is empty; at least 1 pair is needed")

    prefix = _get(cfg, "prefix", "auto")
    if prefix == "auto":
        prefix = PREFIXES[direction]
    info.update(n_train=len(train), n_valid=len(valid), direction=direction, prefix=prefix)
    if test:
        info["n_test"] = len(test)
    data = TranslationData(train=train, valid=valid, direction=direction, prefix=prefix, info=info, test=test)
    data.info["fingerprint"] = data.fingerprint()
    return data


def _hash_files(directory: Path) -> dict:
    return {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.suffix in (".jsonl", ".de", ".en")
    }


def can_reach(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """A quick reachability probe, so that offline runs fail at once rather than after retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable(cfg: Mapping[str, Any]) -> str | None:
    """What of this data config cannot be reached from here (offline, not cached), or None.

    Cheap (a socket probe, then an offline look at the datasets cache): run it before any heavy work.
    """
    if _get(cfg, "source") != "wmt16":
        return None
    if os.environ.get("HF_DATASETS_OFFLINE") != "1" and can_reach("huggingface.co"):
        return None
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets  # here: it reads HF_HUB_OFFLINE when imported, set just above

        datasets.load_dataset_builder("wmt16", "de-en")
        return None  # in the local datasets cache
    except Exception:
        return "the dataset WMT16 de-en (datasets.load_dataset('wmt16', 'de-en'): huggingface.co is not reachable and it is not in the datasets cache)"


def _load_wmt16(cfg) -> tuple[list[dict], list[dict], list[dict]]:
    offline_hint = (
        "run the same recipe on local data: data=multi30k data.path=<dir with a Multi30K copy> "
        "or data=jsonl data.path=<file.jsonl>"
    )
    if not can_reach("huggingface.co") and not os.environ.get("HF_DATASETS_OFFLINE"):
        # Offline: a copy in the datasets cache still works; anything else fails now, not after retries.
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise DataError(f"data=wmt16 needs the `datasets` package (pip install datasets); or {offline_hint}") from None

    def split_spec(split: str, cap):
        parse_split(split)  # a bad spec fails here, naming it
        # a plain split with a cap loads only the first rows; a sliced one (train[:1%]) is capped after loading
        return f"{split}[:{int(cap)}]" if cap is not None and "[" not in split else split

    test_split = _get(cfg, "test_split")
    try:
        train = datasets.load_dataset("wmt16", "de-en", split=split_spec(_get(cfg, "train_split", "train"), _get(cfg, "max_train")))
        valid = datasets.load_dataset("wmt16", "de-en", split=split_spec(_get(cfg, "valid_split", "validation"), _get(cfg, "max_valid")))
        test = datasets.load_dataset("wmt16", "de-en", split=test_split) if test_split else []
    except Exception as e:  # ConnectionError, FileNotFoundError, hub errors: all mean "not reachable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot load the WMT16 de-en dataset (datasets.load_dataset('wmt16', 'de-en')): {first}. "
            f"Offline? {offline_hint}"
        ) from None

    def rows(ds):
        out = []
        for r in ds:
            t = r["translation"]
            out.append({"de": t["de"].strip(), "en": t["en"].strip()})
        return out

    return rows(train), rows(valid), rows(test)
