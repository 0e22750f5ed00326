"""Writing files so that a reader never sees half of one: the one copy of these helpers in lora3.

Every file lora3 or its app writes (adapters, metrics, configs, checkpoints, tokenizers, cached
bases) goes through `atomic_write_bytes` / `atomic_write_text` (a temporary file beside the target,
fsynced, then `os.replace`) or `staged_dir` (a temporary directory beside the target that replaces
it whole on success and is removed on failure). `sha256_file` is the one checksum.

Example:
>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> atomic_write_text(os.path.join(d, "a.txt"), "hello")
>>> with staged_dir(os.path.join(d, "adapter")) as tmp:
...     atomic_write_text(os.path.join(tmp, "w.txt"), "weights")
>>> sorted(os.listdir(d))
['a.txt', 'adapter']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from lora3.errors import AdapterError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` (creating its folder) so the file is either old or new, never partial."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves directory `new` to `target`, replacing it; `target` is never half-written (the old one
    is moved aside first and put back if the move fails)."""
    new, target = os.fspath(new), os.fspath(target)
    if not os.path.exists(target):
        os.rename(new, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike):
    """Yields a fresh temporary directory beside `target`; on a clean exit it replaces `target`
    (`replace_dir`), on an exception it is removed and `target` is left as it was."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold an object (an adapter's config): its contents as a dict.

    Args:
        path: str or path of the file (it must exist).

    Raises:
        AdapterError: the file is not valid JSON or holds something else than an object,
            naming the file.

    Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "adapter_config.json")
    >>> atomic_write_text(path, '{"r": 8}')
    >>> read_json_object(path)
    {'r': 8}
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
