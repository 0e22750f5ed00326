"""lora3/fileio.py: whole files or none, whole directories or none, one checksum."""

import hashlib
import os

import pytest

from lora3.fileio import atomic_write_bytes, atomic_write_text, replace_dir, sha256_file, staged_dir

pytestmark = pytest.mark.one_backend  # plain file operations


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_staged_dir_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.bin").write_text("from an earlier save")
    with staged_dir(target) as tmp:
        (tmp_path / "adapter" / "stale.bin").read_text()  # the old one is intact while writing
        atomic_write_text(os.path.join(tmp, "weights.bin"), "w")
    assert sorted(os.listdir(target)) == ["weights.bin"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_staged_dir_leaves_the_target_as_it_was_on_error(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "good.bin").write_text("keep me")
    with pytest.raises(RuntimeError):
        with staged_dir(target) as tmp:
            atomic_write_text(os.path.join(tmp, "half.bin"), "x")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(target)) == ["good.bin"] and sorted(os.listdir(tmp_path)) == ["adapter"]


def test_replace_dir_puts_the_old_one_back_if_the_move_fails(tmp_path, monkeypatch):
    old, new = tmp_path / "t", tmp_path / "n"
    old.mkdir(), new.mkdir()
    (old / "a").write_text("old")
    real = os.rename

    def rename(src, dst):
        if str(src) == str(new):
            raise OSError("cross-device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        replace_dir(new, old)
    assert (old / "a").read_text() == "old"


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # over several chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
