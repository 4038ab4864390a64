"""Deterministic, resumable language-model batches over a corpus split.

Token stream. The documents of a split (sorted by name) are tokenised and concatenated as

    [sep] doc_1 [sep] doc_2 [sep] ... doc_n [sep]          (int32)

i.e. every document is followed by the tokenizer's separator (`separator_id`: byte 0 for
ByteTokenizer, <|endoftext|> for BPE), and one leading separator gives the first document the
same "start of document" context as the others. `load_tokens` caches the stream as .npy under
<cache>/tokens/<corpus>/, keyed by split, tokenizer fingerprint and dataset fingerprint (raw
text + split definitions, `corpora.dataset_fingerprint`).

Training windows. With T tokens and sequence length L there are N = (T - 1) // L windows; window
k is tokens[k L : k L + L + 1] (inputs = [:-1], targets = [1:]). `WindowDataset.batch(step)` is a
pure function of (seed, step): a grain MapDataset range(N) -> shuffle(seed) -> repeat -> map(window)
-> batch(B) read by random access. grain reshuffles every epoch (per-epoch seed = seed + epoch,
where the grain seed is derived from the user seed by numpy's SeedSequence, so nearby user seeds
do not share epochs), and a batch may straddle two epochs: window-stream positions
[e N, (e + 1) N) are a permutation of all N windows, for every epoch e. Resuming at step k
therefore reproduces the uninterrupted stream exactly; nothing but (seed, step) is state. The
last (T - 1) - N L tokens (fewer than L) are never a training target.

Evaluation windows. `eval_batches` walks ALL non-overlapping windows in order: ceil((T - 1) / L)
windows, the final partial one padded (with `pad_id`, default 0) and masked, and the last batch
padded with fully masked rows, so shapes stay fixed for jit. Every token but the leading
separator is a target exactly once (mask True).

Bits per byte. `bits_per_byte(total_nll_nats, num_bytes)`; `num_bytes` = the UTF-8 bytes of the
targets: `token_byte_lengths()[target]` summed over the mask, where the separator counts 1 byte.
For the byte tokenizer that is the number of target tokens; for BPE it is the number of bytes the
targets decode to -- the same total for both tokenizers (text bytes + one per document).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import time
import warnings
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from titans_jax.downloads import cache_root
from titans_jax.data import corpora


# --- token streams ----------------------------------------------------------------------------

def concat_documents(docs_tokens: Sequence[np.ndarray], separator_id: int,
                     names: Sequence[str] | None = None) -> np.ndarray:
    """[sep] d_1 [sep] d_2 [sep] ... d_n [sep] as one int32 array.

    Raises ValueError if a document already contains the separator id."""
    parts = [np.asarray([separator_id], np.int32)]
    for i, tokens in enumerate(docs_tokens):
        tokens = np.asarray(tokens, np.int32)
        if np.any(tokens == separator_id):
            name = names[i] if names is not None else f"#{i}"
            raise ValueError(f"document {name} contains the separator id {separator_id}")
        parts += [tokens, np.asarray([separator_id], np.int32)]
    return np.concatenate(parts)


def token_cache_path(corpus: str, split: str, tokenizer) -> pathlib.Path:
    source = corpora.dataset_fingerprint(corpus)[:16]
    return cache_root() / "tokens" / corpus / f"{split}-{tokenizer.fingerprint}-{source}.npy"


def load_tokens(corpus: str, split: str, tokenizer, data_dir=None,
                mmap: bool = True) -> np.ndarray:
    """The split's token stream (see the module docstring), cached as .npy.

    Reads the documents through `titans_jax.data.sources.load_documents` on a cache miss (which
    builds the tfds dataset on first use); raises FileNotFoundError naming the fetch command when
    the raw corpus is missing."""
    from titans_jax.data.sources import load_documents

    path = token_cache_path(corpus, split, tokenizer)
    if path.exists():
        try:
            return _open_token_cache(path, mmap)
        except (ValueError, OSError, EOFError) as error:  # derived data: set it aside and rebuild
            aside = path.with_name(f"{path.stem}.damaged-{time.strftime('%Y%m%d-%H%M%S')}.npy")
            os.replace(path, aside)
            warnings.warn(f"token cache {path} is damaged ({type(error).__name__}: {error}); moved it to "
                          f"{aside.name} and rebuilding it from the corpus", RuntimeWarning, stacklevel=2)
    if not path.exists():
        docs = load_documents(corpus, split, data_dir)
        names = [name for name, _ in docs]
        encoded = (tokenizer.encode_batch([text for _, text in docs]) if hasattr(tokenizer, "encode_batch")
                   else [tokenizer.encode(text) for _, text in docs])
        tokens = concat_documents(encoded, tokenizer.separator_id, names)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        np.save(partial, tokens)
        os.replace(partial, path)
    return _open_token_cache(path, mmap)


def _open_token_cache(path: pathlib.Path, mmap: bool) -> np.ndarray:
    """The cached stream; a truncated, damaged or foreign file raises ValueError / OSError."""
    tokens = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if tokens.dtype != np.int32 or tokens.ndim != 1 or tokens.size < 2:
        raise ValueError(f"expected a 1-D int32 token stream, found {tokens.dtype} of shape {tokens.shape}")
    return tokens


def tokens_fingerprint(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()[:16]


# --- training windows -------------------------------------------------------------------------

def _grain_seed(seed: int) -> int:
    return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


@dataclasses.dataclass(frozen=True)
class WindowState:
    """Everything needed to resume a WindowDataset stream (plain data: store it in a checkpoint)."""
    seed: int
    step: int
    seq_len: int
    batch_size: int
    num_windows: int
    tokens_fingerprint: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class WindowDataset:
    """Shuffled training windows: `batch(step)` -> int32 [batch_size, seq_len + 1], a pure
    function of (seed, step); see the module docstring."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        import grain

        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        self.tokens = tokens
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.num_windows = (len(tokens) - 1) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens)} tokens hold no window of {seq_len} + 1 tokens")
        self._order = grain.MapDataset.range(self.num_windows).shuffle(seed=_grain_seed(seed)).repeat()
        self._batches = self._order.map(self._window).batch(self.batch_size, drop_remainder=True)
        self._fingerprint = None

    def _window(self, k) -> np.ndarray:
        start = int(k) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)

    def batch(self, step: int) -> np.ndarray:
        """Batch `step` (>= 0): int32 [batch_size, seq_len + 1]."""
        if step < 0:
            raise ValueError("step must be >= 0")
        return self._batches[int(step)]

    def window_indices(self, step: int) -> np.ndarray:
        """The window numbers (0 .. num_windows-1) that make up batch `step`."""
        first = int(step) * self.batch_size
        return np.asarray([self._order[first + j] for j in range(self.batch_size)], np.int64)

    def epoch(self, step: int) -> float:
        """Epochs completed after batches 0..step-1 (windows seen / num_windows)."""
        return step * self.batch_size / self.num_windows

    @property
    def steps_per_epoch(self) -> float:
        return self.num_windows / self.batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iterate(0)

    def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokens_fingerprint(self.tokens)
        return self._fingerprint

    def state(self, step: int) -> WindowState:
        """The resumable state at `step` (the next batch to produce)."""
        return WindowState(self.seed, int(step), self.seq_len, self.batch_size, self.num_windows,
                           self.fingerprint)

    @classmethod
    def from_state(cls, tokens: np.ndarray, state: WindowState | dict) -> tuple["WindowDataset", int]:
        """(dataset, step) resuming `state`; ValueError if `tokens` are not the same stream."""
        if isinstance(state, dict):
            state = WindowState(**state)
        dataset = cls(tokens, state.seq_len, state.batch_size, state.seed)
        if dataset.num_windows != state.num_windows or dataset.fingerprint != state.tokens_fingerprint:
            raise ValueError("the token stream differs from the one this state was saved with "
                             f"({dataset.num_windows} windows, {dataset.fingerprint} vs "
                             f"{state.num_windows}, {state.tokens_fingerprint})")
        return dataset, state.step


# --- evaluation -------------------------------------------------------------------------------

class EvalBatch(NamedTuple):
    tokens: np.ndarray   # int32 [batch, seq_len + 1]: inputs = [:, :-1], targets = [:, 1:]
    mask: np.ndarray     # bool  [batch, seq_len]: True where the target is real (not padding)


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, math.ceil((num_tokens - 1) / seq_len))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 pad_id: int = 0) -> Iterator[EvalBatch]:
    """All non-overlapping windows of the stream, in order, with fixed shapes (see module doc)."""
    tokens = np.asarray(tokens)
    windows = num_eval_windows(len(tokens), seq_len)
    for first in range(0, windows, batch_size):
        out = np.full((batch_size, seq_len + 1), pad_id, np.int32)
        mask = np.zeros((batch_size, seq_len), bool)
        for row, k in enumerate(range(first, min(first + batch_size, windows))):
            start = k * seq_len
            piece = tokens[start:start + seq_len + 1]
            out[row, :len(piece)] = piece
            mask[row, :len(piece) - 1] = True
        yield EvalBatch(out, mask)


def batch_num_bytes(batch: EvalBatch, byte_lengths: np.ndarray) -> int:
    """UTF-8 bytes of the batch's real targets (separator = 1 byte)."""
    return int((byte_lengths[batch.tokens[:, 1:]] * batch.mask).sum())


def stream_num_bytes(tokens: np.ndarray, byte_lengths: np.ndarray) -> int:
    """UTF-8 bytes of every target of a stream (all tokens but the leading separator)."""
    return int(byte_lengths[np.asarray(tokens[1:])].sum())


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Summed next-token NLL (nats) over targets -> bits per UTF-8 byte of those targets."""
    if num_bytes <= 0:
        raise ValueError("num_bytes must be positive")
    return float(total_nll_nats) / (num_bytes * math.log(2))


__all__ = [
    "EvalBatch", "WindowDataset", "WindowState", "batch_num_bytes", "bits_per_byte",
    "concat_documents", "eval_batches", "load_tokens", "num_eval_windows", "stream_num_bytes",
    "token_cache_path", "tokens_fingerprint",
]
