"""Fuzz the data readers (hypothesis, small budget): any bytes in a .jsonl or a .de/.en pair either
read as pairs of non-empty stripped strings or raise DataError (documented), never anything else."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora3.run import data as data_mod
from lora3.run.data.readers import DataError, read_jsonl, read_plain_pair

pytestmark = pytest.mark.one_backend
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

LINE = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=40).map(str.encode),
    st.builds(lambda de, en: json.dumps({"translation": {"de": de, "en": en}}).encode(),
              st.one_of(st.text(max_size=12), st.integers(), st.none()), st.one_of(st.text(max_size=12), st.none())),
    st.sampled_from([b"", b"\r", b"\xef\xbb\xbf{}", b'{"translation": []}', b"[1, 2]", b"null", b'"x"',
                     b'{"translation": {"de": "a", "en": "b"}}', b"\xff\xfe", b"NaN"]),
)


def _check_pairs(pairs):
    for p in pairs:
        assert set(p) == {"de", "en"}
        assert all(isinstance(v, str) and v and v == v.strip() for v in p.values())


@SETTINGS
@given(lines=st.lists(LINE, max_size=6), sep=st.sampled_from([b"\n", b"\r\n"]))
def test_read_jsonl_fuzz(tmp_path_factory, lines, sep):
    f = tmp_path_factory.mktemp("j") / "x.jsonl"
    f.write_bytes(sep.join(lines))
    try:
        pairs = read_jsonl(f)
    except DataError as e:
        assert str(f) in str(e)
    else:
        _check_pairs(pairs)


@SETTINGS
@given(de=st.lists(st.binary(max_size=20) | st.text(max_size=15).map(str.encode), max_size=5),
       en=st.lists(st.binary(max_size=20) | st.text(max_size=15).map(str.encode), max_size=5))
def test_read_plain_pair_fuzz(tmp_path_factory, de, en):
    d = tmp_path_factory.mktemp("p")
    (d / "train.de").write_bytes(b"\n".join(de))
    (d / "train.en").write_bytes(b"\n".join(en))
    try:
        pairs = read_plain_pair(d / "train")
    except DataError as e:
        assert "train." in str(e)
    else:
        _check_pairs(pairs)


@SETTINGS
@given(lines=st.lists(LINE, max_size=8), fraction=st.floats(0.01, 0.99))
def test_load_jsonl_source_fuzz(tmp_path_factory, lines, fraction):
    f = tmp_path_factory.mktemp("l") / "x.jsonl"
    f.write_bytes(b"\n".join(lines))
    try:
        d = data_mod.load({"source": "jsonl", "path": str(f), "valid_fraction": fraction}, seed=0)
    except DataError:
        return
    assert len(d.train) >= 2 and len(d.valid) >= 1
    _check_pairs(d.train + d.valid)
