"""Whole documents of a corpus split, read through tensorflow-datasets (array_record, no TF).

    from titans_jax.data.sources import load_documents
    docs = load_documents("books", "validation")     # [(name, text), ...] sorted by name

The first call builds the `titans_corpora/<corpus>` dataset under data_dir (default
<cache>/tfds) from the raw text in the cache; later calls read the built array_record files. The
build records a stamp beside the dataset: the builder's version and `corpora.dataset_fingerprint`
(the sources' MANIFEST.json fingerprints and the split definitions: book lists, code salt and
buckets). A dataset built from other raw text (re-fetched, another interpreter's stdlib), with
other split rules or by another builder version is rebuilt.
Missing raw text raises FileNotFoundError naming `python -m titans_jax.data.fetch books|code`.
"""

from __future__ import annotations

import pathlib
import shutil

from titans_jax.downloads import cache_root, exclusive_lock
from titans_jax.data import corpora

FINGERPRINT_FILE = "titans_source_fingerprint.txt"


def default_data_dir() -> pathlib.Path:
    """<cache>/tfds."""
    return cache_root() / "tfds"


def _builder(corpus: str, data_dir):
    import titans_jax.data.tfds_corpora as tfds_corpora  # registers the builder with tfds

    if corpus not in corpora.CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {corpora.CORPORA}")
    return tfds_corpora.TitansCorpora(config=corpus, data_dir=str(data_dir))


def build(corpus: str, data_dir: str | pathlib.Path | None = None, force: bool = False):
    """Build (or reuse) the array_record dataset of `corpus`; returns the tfds builder.

    Raises FileNotFoundError (naming the fetch command) when the raw text is missing, ValueError
    when it is damaged (a file's sha256 differs from its manifest)."""
    import tensorflow_datasets as tfds

    data_dir = pathlib.Path(data_dir or default_data_dir())
    builder = _builder(corpus, data_dir)
    fingerprint = f"{builder.VERSION} {corpora.dataset_fingerprint(corpus)}"
    version_dir = pathlib.Path(builder.data_dir)
    stamp = version_dir / FINGERPRINT_FILE
    if not force and _stamp(stamp) == fingerprint:
        return builder
    # one builder at a time; the stamp is read again under the lock (another process may have built it)
    with exclusive_lock(data_dir / f".titans_corpora_{corpus}.lock"):
        if force or _stamp(stamp) != fingerprint:
            if version_dir.exists():
                shutil.rmtree(version_dir)
            builder = _builder(corpus, data_dir)
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(
                    compute_stats=tfds.download.ComputeStatsMode.SKIP))
            stamp.write_text(fingerprint + "\n")
            return builder
    # built by another process while this one waited: a builder made before that build does not see it
    return _builder(corpus, data_dir)


def _stamp(path: pathlib.Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def split_names(corpus: str, data_dir=None) -> dict[str, int]:
    """Number of documents per split of the built dataset (building it if needed)."""
    builder = build(corpus, data_dir)
    return {name: info.num_examples for name, info in builder.info.splits.items()}


def load_documents(corpus: str, split: str,
                   data_dir: str | pathlib.Path | None = None) -> list[tuple[str, str]]:
    """All whole documents of a split as (name, text), sorted by name, via tfds.data_source."""
    import tensorflow_datasets as tfds

    if split not in corpora.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {corpora.SPLITS}")
    data_dir = pathlib.Path(data_dir or default_data_dir())
    build(corpus, data_dir)
    source = tfds.data_source(f"titans_corpora/{corpus}", split=split, data_dir=str(data_dir),
                              download=False)
    docs = []
    for i in range(len(source)):
        example = source[i]
        docs.append((_as_str(example["name"]), _as_str(example["text"])))
    return sorted(docs)


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


__all__ = ["build", "default_data_dir", "load_documents", "split_names"]
