"""The fetch helpers without the network: missing-file errors name the fetch command; the R
lazy-load reader decodes character vectors."""

import struct
import zlib

import pytest

from t2_jax import fetch
from titans_jax.downloads import r_lazyload_vectors


def test_missing_model_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path))
    assert fetch.smollm2_path().is_relative_to(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m t2_jax.fetch smollm2"):
        fetch.require_smollm2()
    with pytest.raises(FileNotFoundError, match="python -m t2_jax.fetch austen"):
        fetch.require_austen()


def r_character_vector(strings, version=3):
    """R's XDR serialisation of a character vector, as R writes it."""
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            data = s.encode("utf-8")
            out += struct.pack(">ii", 0x00040009, len(data)) + data
    return out


def test_r_lazyload_reader():
    books = [["PRIDE AND PREJUDICE", "", "It is a truth\u2014universally"], ["EMMA", None, "x"]]
    other = b"X\n" + struct.pack(">iii", 2, 0, 0) + struct.pack(">i", 19)  # a list, skipped
    records = b""
    for blob in [r_character_vector(books[0]), other, r_character_vector(books[1], version=2)]:
        records += struct.pack(">i", len(blob)) + zlib.compress(blob)
    vectors = r_lazyload_vectors(records)
    assert vectors == [books[0], ["EMMA", "", "x"]]
