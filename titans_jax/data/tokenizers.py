"""Tokenizers with one interface: `encode(str) -> np.int32[n]`, `decode(ids) -> str`,
`vocab_size`, `separator_id` (the document separator), `fingerprint` (a string naming the exact
vocabulary: store it in a checkpoint and refuse a different one with `check_fingerprint`) and
`token_byte_lengths()` (UTF-8 bytes of each token id, for bits-per-byte).

- ByteTokenizer (default): the UTF-8 bytes, vocab 256. The separator is byte 0 (NUL), which no
  text of the corpora contains (the books are ASCII/UTF-8 prose, the stdlib files have no NUL).
- BPETokenizer: byte-level BPE from the `tokenizers` package (`train_bpe` / `load_bpe`). Id 0 is
  the special token "<|endoftext|>", the separator; every string round-trips exactly.

For bits per byte the separator counts as one byte (see titans_jax.data.pipeline).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Iterable, Protocol

import numpy as np

SEPARATOR_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    separator_id: int
    fingerprint: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def token_byte_lengths(self) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); separator id 0."""

    vocab_size = 256
    separator_id = 0
    fingerprint = "bytes-utf8-v1-256"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, ids) -> str:
        """Bytes back to text; an invalid UTF-8 sequence (e.g. sampled output) becomes U+FFFD."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("byte token ids must be in [0, 256)")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        return np.ones(256, np.int32)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` behind the common interface."""

    def __init__(self, tokenizer, path: str | pathlib.Path | None = None):
        self._tok = tokenizer
        self.path = None if path is None else pathlib.Path(path)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        separator = tokenizer.token_to_id(SEPARATOR_TOKEN)
        if separator is None:
            raise ValueError(f"BPE tokenizer has no {SEPARATOR_TOKEN} token")
        self.separator_id = int(separator)
        canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, separators=(",", ":"))
        self.fingerprint = f"bpe-bytelevel-{self.vocab_size}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each token stands for: byte-level BPE maps every byte to one printable character,
        so a regular token's length in characters is its length in bytes; special tokens
        (the separator) count 1."""
        lengths = np.ones(self.vocab_size, np.int32)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for token, index in self._tok.get_vocab(with_added_tokens=True).items():
            if token not in special:
                lengths[index] = len(token)
        return lengths

    def save(self, path: str | pathlib.Path) -> None:
        self._tok.save(str(path))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, path={self.path})"


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | pathlib.Path,
              min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, the 256 byte symbols always in the
    vocabulary, id 0 = <|endoftext|>) on `texts`, save it to `path` (JSON) and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError("a byte-level BPE needs vocab_size >= 257 (256 bytes + the separator)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[SEPARATOR_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return load_bpe(path)


def load_bpe(path: str | pathlib.Path) -> BPETokenizer:
    """Load a BPE tokenizer saved by `train_bpe` (FileNotFoundError when absent)."""
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"BPE tokenizer file {path} not found; train one with "
                                f"titans_jax.data.tokenizers.train_bpe(texts, vocab_size, path)")
    return BPETokenizer(Tokenizer.from_file(str(path)), path)


def check_fingerprint(tokenizer: Tokenizer, expected: str) -> None:
    """Refuse a tokenizer whose vocabulary differs from the one a checkpoint was trained with."""
    if tokenizer.fingerprint != expected:
        raise ValueError(f"tokenizer fingerprint {tokenizer.fingerprint!r} differs from the "
                         f"checkpoint's {expected!r}: a different vocabulary")


__all__ = ["BPETokenizer", "ByteTokenizer", "SEPARATOR_TOKEN", "Tokenizer", "check_fingerprint",
           "load_bpe", "train_bpe"]
