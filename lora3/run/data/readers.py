"""Readers for local translation files. Every error names the file and, where it applies, the line.

- JSON Lines in the Hugging Face `translation` schema: `{"translation": {"de": "...", "en": "..."}}`
- plain-text pairs: `<stem>.de` and `<stem>.en`, line i of one translates line i of the other.

Whitespace at either end of a sentence is stripped (Multi30K has 40 such German lines);
tabs inside a sentence are kept. Blank lines are skipped in JSONL and refused in plain pairs
(where they would shift the alignment).
"""

from __future__ import annotations

import json
from pathlib import Path

from lora3.errors import Lora3Error

LANGS = ("de", "en")


class DataError(Lora3Error):
    """A dataset cannot be read: missing file, malformed line, wrong schema, too small."""


def _decode_lines(path: Path):
    """Yields (line number, text) for a UTF-8 file, failing on the first undecodable line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file, got a directory: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines, start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            yield i, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{i}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                "files must be UTF-8 encoded"
            ) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Reads a JSONL file in the HF translation schema into a list of {"de": ..., "en": ...}."""
    path = Path(path)
    pairs = []
    for i, line in _decode_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        tr = obj.get("translation") if isinstance(obj, dict) else None
        if not isinstance(tr, dict):
            raise DataError(
                f'{path}:{i}: expected an object {{"translation": {{"de": "...", "en": "..."}}}}, '
                f"got {line[:80]!r}"
            )
        pair = {}
        for lang in LANGS:
            text = tr.get(lang)
            if not isinstance(text, str):
                raise DataError(
                    f'{path}:{i}: "translation" needs string fields "de" and "en"; '
                    f"{lang!r} is {'missing' if lang not in tr else type(text).__name__}"
                )
            text = text.strip()
            if not text:
                raise DataError(f"{path}:{i}: empty {lang!r} sentence")
            pair[lang] = text
        pairs.append(pair)
    return pairs


def read_plain_pair(stem: str | Path) -> list[dict]:
    """Reads `<stem>.de` and `<stem>.en` (aligned line by line)."""
    stem = Path(stem)
    files = {lang: stem.with_name(stem.name + "." + lang) for lang in LANGS}
    texts = {}
    for lang, f in files.items():
        lines = []
        for i, line in _decode_lines(f):
            text = line.strip()
            if not text:
                raise DataError(f"{f}:{i}: empty line (a blank line would misalign the .de/.en pairs)")
            lines.append(text)
        texts[lang] = lines
    if len(texts["de"]) != len(texts["en"]):
        raise DataError(
            f"{files['de']} has {len(texts['de'])} lines but {files['en']} has {len(texts['en'])}: "
            "plain-text pairs must have the same number of lines"
        )
    return [{"de": d, "en": e} for d, e in zip(texts["de"], texts["en"])]


def detect_format(directory: Path, split: str) -> str:
    if (directory / f"{split}.jsonl").is_file():
        return "jsonl"
    if (directory / f"{split}.de").is_file() or (directory / f"{split}.en").is_file():
        return "plain"
    raise DataError(
        f"no {split}.jsonl and no {split}.de/{split}.en in {directory}; "
        "set data.path=<directory holding them>"
    )


def read_split(directory: Path, split: str, fmt: str = "auto") -> list[dict]:
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory} (set data.path=<directory>)")
    if fmt == "auto":
        fmt = detect_format(directory, split)
    if fmt == "jsonl":
        return read_jsonl(directory / f"{split}.jsonl")
    if fmt == "plain":
        return read_plain_pair(directory / split)
    raise DataError(f"data.format={fmt!r} is not valid; valid: auto, jsonl, plain")
