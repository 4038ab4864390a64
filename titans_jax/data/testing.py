"""Tiny fixture corpora for tests: a cache with a few lines of 'books' and 'code', built by the
project itself, so that the whole data pipeline runs without fetched data; and a helper that calls a
function from two threads at once (concurrent dataset builds)."""

from __future__ import annotations

import pathlib
import threading

from titans_jax.data import corpora

BOOK_FIXTURES = {
    # name -> text; hamlet/persuasion/ruth are validation, macbeth/northangerabbey/job test
    "shakespeare/hamlet": "HAMLET\n\nWho's there?\nNay, answer me: stand, and unfold yourself.\n",
    "shakespeare/macbeth": "MACBETH\n\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n",
    "shakespeare/lear": "KING LEAR\n\nMeantime we shall express our darker purpose.\n",
    "austen/persuasion": "Persuasion\n\nSir Walter Elliot, of Kellynch Hall, in Somersetshire...\n",
    "austen/northangerabbey": "NORTHANGER ABBEY\n\nNo one who had ever seen Catherine Morland...\n",
    "austen/emma": "EMMA\n\nEmma Woodhouse, handsome, clever, and rich — naïve café 😀\n",
    "kjv/01_genesis": "Genesis\n\n1:1 In the beginning God created the heaven and the earth.\n",
    "kjv/08_ruth": "Ruth\n\n1:1 Now it came to pass in the days when the judges ruled.\n",
    "kjv/18_job": "Job\n\n1:1 There was a man in the land of Uz, whose name was Job.\n",
}


def code_fixture_names():
    """Module paths that land in every split of the code hash rule (deterministic search)."""
    names, seen = [], set()
    i = 0
    while len(seen) < 3 or len(names) < 6:
        name = f"pkg{i % 3}/mod{i}.py"
        split = corpora.document_split("code", name)
        if split not in seen or len(names) < 6:
            names.append(name)
            seen.add(split)
        i += 1
    return names


def write_fixture_cache(cache: pathlib.Path) -> pathlib.Path:
    """Write the fixture books and code into `cache` (TITANS_JAX_CACHE must point at it)."""
    for name, text in BOOK_FIXTURES.items():
        source, stem = name.split("/")
        path = cache / "texts" / source / f"{stem}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for source in corpora.BOOK_SOURCES:
        corpora.write_manifest(cache / "texts" / source, source)
    folder = corpora.code_dir()
    for i, name in enumerate(code_fixture_names()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'"""module {i}"""\n\ndef f{i}(x):\n    return x + {i}\n', encoding="utf-8")
    corpora.write_manifest(folder, corpora.code_version(), pattern="*.py")
    return cache


def call_together(fn, count: int = 2) -> tuple[list, list[BaseException]]:
    """Call `fn()` from `count` threads at once; (its results, the exceptions raised), each in
    finishing order."""
    results, errors = [], []

    def call():
        try:
            results.append(fn())
        except Exception as error:  # noqa: BLE001 -- returned to the caller
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors
