"""Long-context examples: RULER S-NIAH (niah_single_1/2/3) and BABILong QA1-QA5, seeded.

    from titans_jax.long_context import make_example, make_examples, score
    ex = make_example("niah_single_2", length=4096, depth=0.5, seed=0)   # essays haystack
    ex.prompt        # template + context + question + answer prefix; 4096 UTF-8 bytes exactly
    ex.answer        # "8723011"
    score(ex, model_output)    # RULER string_match_all (niah) / BABILong first-sentence match (qa)

Lengths are in model tokens of `tokenizer` (default ByteTokenizer: a token is a UTF-8 byte). The
whole prompt (instruction/template + context + question + answer prefix; nothing reserved for the
answer) is at most `length` tokens and, with the ByteTokenizer, exactly `length`: the haystack
text is cut after whole sentences plus a prefix of the next one, and at most 3 spaces pad a cut
multi-byte character. Any tokenizer with encode(str) -> ids works (a BPE one gives "at most").

S-NIAH (RULER, scripts/data/synthetic/niah.py and constants.py, single needle):
  niah_single_1  noise haystack (RULER's repeated block, joined by "\\n")  value: 7-digit number
  niah_single_2  Paul Graham essays                                       value: 7-digit number
  niah_single_3  Paul Graham essays                                       value: UUID4
  needle  "One of the special magic {numbers|uuids} for {key} is: {value}." (plural, as RULER)
  key     "{adjective}-{noun}" from titans_jax.long_context.words
  prompt  RULER's template + answer prefix after its singular rewrite (NIAH_TEMPLATE below)
  depth   the needle goes at the sentence boundary nearest to depth * (context length); depth
          None draws one of RULER's depths round(linspace(0, 100, 40)) / 100.
BABILong (booydar/babilong): a bAbI-like story (titans_jax.long_context.babilong) whose sentences
  go, in order, at sorted random sentence boundaries of book text inside the window
  [depth_lo, depth_hi] of the context (default the whole context); depth may be a float d
  (window [d, d]: the story is contiguous at depth d) or a (lo, hi) pair.

Determinism: an example is a pure function of (GENERATOR_VERSION, task, seed, length, depth,
haystack fingerprint, tokenizer, options). The needle/story depends on (task, seed) only, so the
same seed gives the same key/value (or story) at every length and depth. Random numbers come from
Python's `random.Random` (stable across versions and machines), seeded by sha256.

Scoring: `string_match_all` (RULER: the gold value appears in the output, case-insensitive) for
niah; `babilong_match` (lower-case the output, keep its first sentence, the target must be a
substring) for qa.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import uuid

import numpy as np

from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context import babilong
from titans_jax.long_context.haystacks import Haystack, get_haystack
from titans_jax.long_context.words import ADJECTIVES, NOUNS

# Bump whenever anything that defines the examples changes (templates, word lists, the story
# simulator, the sentence splitter, the fitting rule, the random draws). It is part of every
# evaluation-set key and of the tfds builder version.
GENERATOR_VERSION = 1

NIAH_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3")
QA_TASKS = babilong.QA_TASKS
TASKS = NIAH_TASKS + QA_TASKS

DEFAULT_HAYSTACK = {"niah_single_1": "noise", "niah_single_2": "essays", "niah_single_3": "essays",
                    **{task: "books" for task in QA_TASKS}}
NIAH_VALUE_TYPE = {"niah_single_1": "numbers", "niah_single_2": "numbers", "niah_single_3": "uuids"}

NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# RULER's niah template + answer_prefix with its single-needle rewrite applied
# ('Some' -> 'A', 'are all' -> 'is', 'are' -> 'is', type_needle_v without its final 's').
NIAH_TEMPLATE = (
    "A special magic {type_needle_v} is hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat is the special "
    "magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text is"
RULER_DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))

MAX_PAD = 3  # spaces that may pad a cut multi-byte character (ByteTokenizer exactness)


@dataclasses.dataclass(frozen=True)
class Example:
    """One long-context example.

    prompt          the full model input: template/instruction + context + question + answer
                    prefix (feed it as is; the model continues it)
    answer          the gold answer (niah: the value; qa: a place, person or object)
    task, seed      as requested; depth: the requested depth (niah: float; qa: (lo, hi) window),
                    after drawing a RULER depth when None was given
    length          tokens of `prompt` under the tokenizer (== requested_length with bytes)
    needle_chars    (start, end) character spans in `prompt` of the needle (niah: exactly one) or
                    of each story sentence (qa), in order
    needle_tokens   the same spans in tokens (token offset of the prompt prefix before each end)
    context_chars   (start, end) of the context (haystack + needle/facts) in `prompt`
    question        the question; answer_prefix: what the prompt ends with after it (niah)
    haystack, haystack_fingerprint, tokenizer_fingerprint, generator_version: what made it
    """

    task: str
    prompt: str
    answer: str
    length: int
    requested_length: int
    depth: float | tuple[float, float]
    seed: int
    needle_chars: tuple[tuple[int, int], ...]
    needle_tokens: tuple[tuple[int, int], ...]
    context_chars: tuple[int, int]
    question: str
    answer_prefix: str
    haystack: str
    haystack_fingerprint: str
    tokenizer_fingerprint: str
    generator_version: int = GENERATOR_VERSION

    @property
    def needle_depth(self) -> float:
        """Where the (first) needle starts, as a fraction of the context outside the needles."""
        start, end = self.context_chars
        needle = sum(e - s for s, e in self.needle_chars)
        free = max(end - start - needle, 1)
        return (self.needle_chars[0][0] - start) / free

    @property
    def key(self) -> str:
        return example_key(self.task, self.requested_length, self.depth, self.seed)


def example_key(task: str, length: int, depth, seed: int) -> str:
    """'task/L<length>/d<depth>/s<seed>': the key of an example inside an evaluation set."""
    if depth is None:
        text = "any"
    elif isinstance(depth, tuple):
        text = f"{depth[0]:g}-{depth[1]:g}"
    else:
        text = f"{depth:g}"
    return f"{task}/L{length}/d{text}/s{seed}"


# --- scoring -----------------------------------------------------------------------------------

def string_match_all(prediction: str, references) -> float:
    """RULER's per-sample string_match_all in [0, 1]: the fraction of gold strings that occur in
    the prediction, case-insensitive."""
    references = [references] if isinstance(references, str) else list(references)
    return sum(1.0 if r.lower() in prediction.lower() else 0.0 for r in references) / len(references)


def babilong_match(prediction: str, target: str) -> float:
    """BABILong's check in {0, 1}: lower-case the output, keep its first sentence (up to the first
    '.', '!', '?' or newline), and count it when the target is a substring."""
    text = prediction.lower().strip()
    for stop in (".", "!", "?", "\n"):
        text = text.split(stop, 1)[0]
    return 1.0 if target.lower() in text else 0.0


def score(example: Example, prediction: str) -> float:
    """The task's metric for one model output (continuation of example.prompt), in [0, 1]."""
    if example.task in NIAH_TASKS:
        return string_match_all(prediction, [example.answer])
    return babilong_match(prediction, example.answer)


# --- randomness --------------------------------------------------------------------------------

def _rng(*parts) -> random.Random:
    text = ":".join(str(p) for p in (f"titans-long-context-v{GENERATOR_VERSION}",) + parts)
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big"))


def niah_key_value(task: str, seed: int) -> tuple[str, str]:
    """The (key, value) of a niah example: RULER's adjective-noun key and a 7-digit number / UUID4."""
    rng = _rng(task, seed, "needle")
    key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if NIAH_VALUE_TYPE[task] == "numbers":
        value = str(rng.randint(10 ** 6, 10 ** 7 - 1))
    else:
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return key, value


def example_story(task: str, seed: int) -> babilong.Story:
    """The story of every example of a qa task and seed, whatever its length, depth or haystack."""
    if task not in QA_TASKS:
        raise ValueError(f"{task!r} has no story; expected one of {QA_TASKS}")
    return babilong.generate_story(task, _rng(task, seed, "story"))


def example_answer(task: str, seed: int) -> str:
    """The gold answer of every example of (task, seed), whatever its length, depth or haystack."""
    if task in NIAH_TASKS:
        return niah_key_value(task, seed)[1]
    if task in QA_TASKS:
        return example_story(task, seed).answer
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# --- fitting a context to a length ----------------------------------------------------------------

def _is_byte_tokenizer(tokenizer) -> bool:
    fingerprint = getattr(tokenizer, "fingerprint", "")
    return isinstance(tokenizer, ByteTokenizer) or fingerprint.startswith("bytes-")


def _count(tokenizer, text: str) -> int:
    if _is_byte_tokenizer(tokenizer):
        return len(text.encode("utf-8"))
    return int(len(tokenizer.encode(text)))


class _Layout:
    """A prompt from a haystack window cut to n characters: each insert (needle or fact), in
    order, goes to the sentence boundary nearest to its fraction of the cut haystack. An insert
    before a sentence is followed by the joiner; one at the very end is preceded by it."""

    def __init__(self, sentences: list[str], joiner: str, inserts: list[str],
                 fractions: list[float], render):
        self.joiner, self.inserts, self.fractions, self.render = joiner, inserts, fractions, render
        self.text = joiner.join(sentences)
        lengths = [len(sentence) + len(joiner) for sentence in sentences[:-1]]
        self.starts = np.cumsum([0] + lengths, dtype=np.int64)   # sentence starts in self.text

    def build(self, n: int, pad: int = 0):
        """(prompt, insert spans, context span) for the haystack cut to n characters plus `pad`
        spaces (which make up for a cut multi-byte character)."""
        haystack = self.text[:n] + " " * pad
        size = len(haystack)
        boundaries = np.append(self.starts[self.starts < size], size)
        positions = [int(boundaries[np.argmin(np.abs(boundaries - f * size))])
                     for f in self.fractions]
        pieces, spans, cursor, offset = [], [], 0, 0

        def emit(text, is_insert=False):
            nonlocal offset
            if is_insert:
                spans.append((offset, offset + len(text)))
            pieces.append(text)
            offset += len(text)

        for index, (position, insert) in enumerate(zip(positions, self.inserts)):
            emit(haystack[cursor:position])
            cursor = position
            if position < size:                  # before a sentence: insert, then the joiner
                emit(insert, True)
                emit(self.joiner)
            else:                                # at the very end: the joiner, then the insert
                if size or index:
                    emit(self.joiner)
                emit(insert, True)
        emit(haystack[cursor:])
        context = "".join(pieces)
        before, after = self.render(context)
        shift = len(before)
        spans = [(start + shift, end + shift) for start, end in spans]
        return before + context + after, spans, (shift, shift + len(context))


def _fit(haystack: Haystack, rng_window: random.Random, length: int, tokenizer, inserts, fractions,
         render, task: str):
    """The longest prompt of at most `length` tokens (exactly `length` with bytes)."""
    empty = _Layout([], haystack.joiner, inserts, fractions, render)
    overhead = _count(tokenizer, empty.build(0)[0])
    if length < overhead:
        raise ValueError(f"{task}: length {length} is shorter than the template, needle(s) and "
                         f"question alone ({overhead} tokens); ask for at least {overhead}")
    budget = length - overhead
    if _is_byte_tokenizer(tokenizer):
        chars_per_token = 1.0
    else:
        sample = " ".join(haystack.sentences[0][:200]) or "x"
        chars_per_token = 1.25 * len(sample) / max(_count(tokenizer, sample), 1)
    want = int(budget * chars_per_token) + 16
    while True:
        # a fresh copy of the window generator for every attempt: same draws, longer window
        rng = random.Random()
        rng.setstate(rng_window.getstate())
        if not haystack.repeating:
            want = min(want, haystack.num_chars)
        layout = _Layout(haystack.window(want, rng), haystack.joiner, inserts, fractions, render)
        top = len(layout.text)
        if _count(tokenizer, layout.build(top)[0]) > length:
            break                                    # enough text: cut it below
        if not haystack.repeating and want >= haystack.num_chars:
            break                                    # all the haystack fits: checked below
        want *= 2
    # largest n with count(build(n)) <= length (count is non-decreasing in n)
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count(tokenizer, layout.build(mid)[0]) <= length:
            lo = mid
        else:
            hi = mid - 1
    built = layout.build(lo)
    count = _count(tokenizer, built[0])
    if count < length and lo < top:
        for pad in range(1, MAX_PAD + 1):
            padded = layout.build(lo, pad)
            padded_count = _count(tokenizer, padded[0])
            if padded_count > length:
                break
            built, count = padded, padded_count
            if count == length:
                break
    if count < length and lo >= top:
        raise ValueError(
            f"{task}: haystack {haystack.name!r} ({haystack.num_chars:,} characters) is too short "
            f"for {length} tokens without repeating a document; ask for a shorter length or give "
            f"a larger haystack")
    return built, count


def _check_depth(task: str, depth):
    def check(value):
        if not isinstance(value, (int, float, np.floating, np.integer)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{task}: depth must be in [0, 1], got {value!r}")
        return float(value)

    if task in NIAH_TASKS:
        if isinstance(depth, (tuple, list)):
            raise ValueError(f"{task}: depth must be one number in [0, 1] (the needle's position)")
        return None if depth is None else check(depth)
    if depth is None:
        return (0.0, 1.0)
    if isinstance(depth, (tuple, list)):
        if len(depth) != 2:
            raise ValueError(f"{task}: a depth window is (lo, hi), got {depth!r}")
        lo, hi = check(depth[0]), check(depth[1])
        if lo > hi:
            raise ValueError(f"{task}: depth window ({lo}, {hi}) has lo > hi")
        return (lo, hi)
    value = check(depth)
    return (value, value)


def _layout_spec(task: str, seed: int, depth, qa_examples: bool):
    """What an example of (task, seed, depth) inserts into its haystack, and how it renders:
    (inserts, fractions, render, answer, question, answer_prefix, depth)."""
    if task in NIAH_TASKS:
        key, value = niah_key_value(task, seed)
        if depth is None:
            depth = _rng(task, seed, "depth").choice(RULER_DEPTHS) / 100
        type_plural = NIAH_VALUE_TYPE[task]
        type_single = type_plural[:-1]
        needle = NIAH_NEEDLE.format(type_needle_v=type_plural, key=key, value=value)
        question = NIAH_TEMPLATE.split("\n{context}\n")[1].format(type_needle_v=type_single, query=key)
        answer_prefix = NIAH_ANSWER_PREFIX.format(type_needle_v=type_single, query=key)
        head = NIAH_TEMPLATE.split("{context}")[0].format(type_needle_v=type_single)

        def render(context):
            return head, "\n" + question + answer_prefix

        return [needle], [depth], render, value, question, answer_prefix, depth
    story = example_story(task, seed)
    lo, hi = depth
    fact_rng = _rng(task, seed, "positions")
    fractions = sorted(fact_rng.uniform(lo, hi) for _ in story.facts)
    marker = "\x00CONTEXT\x00"
    before, after = babilong.format_prompt(task, marker, story.question, qa_examples).split(marker)

    def render(context):
        return before, after

    return list(story.facts), fractions, render, story.answer, story.question, "", depth


def _prepare(task, length, depth, seed, tokenizer, haystack):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if length is not None and (not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length <= 0):
        raise ValueError(f"{task}: length must be a positive int, got {length!r}")
    tokenizer = tokenizer or ByteTokenizer()
    haystack = get_haystack(haystack or DEFAULT_HAYSTACK[task]) if not isinstance(haystack, Haystack) else haystack
    return _check_depth(task, depth), int(seed), tokenizer, haystack


def min_length(task: str, seed: int = 0, depth=None, tokenizer=None, haystack: Haystack | str | None = None,
               qa_examples: bool = False) -> int:
    """The shortest prompt make_example can build for (task, seed): the template, the needle(s)
    or story and the question with no haystack text at all, in tokens of `tokenizer`."""
    depth, seed, tokenizer, haystack = _prepare(task, None, depth, seed, tokenizer, haystack)
    inserts, fractions, render, *_ = _layout_spec(task, seed, depth, qa_examples)
    return _count(tokenizer, _Layout([], haystack.joiner, inserts, fractions, render).build(0)[0])


def make_example(task: str, length: int, depth=None, seed: int = 0, tokenizer=None,
                 haystack: Haystack | str | None = None, qa_examples: bool = False) -> Example:
    """One seeded example of `task` with a prompt of `length` tokens (see the module docstring).

    depth: niah -- a float in [0, 1] (None: one of RULER's 40 depths, drawn from the seed);
           qa   -- None (facts anywhere), a float d (story contiguous at d) or a (lo, hi) window.
    haystack: a Haystack, a name ("noise", "essays", "books") or None for the task's default.
    qa_examples: include BABILong's in-prompt example in qa prompts.
    Raises ValueError for an unknown task, a depth outside [0, 1], a length shorter than the
    template + needle (`min_length`), or a haystack too short for the length without repeating a
    document."""
    depth, seed, tokenizer, haystack = _prepare(task, length, depth, seed, tokenizer, haystack)
    length = int(length)
    inserts, fractions, render, answer, question, answer_prefix, depth = _layout_spec(task, seed, depth, qa_examples)
    (prompt, spans, context_span), count = _fit(haystack, _rng(task, seed, "window"), length, tokenizer, inserts,
                                               fractions, render, task)
    if _is_byte_tokenizer(tokenizer):
        token_spans = [(len(prompt[:s].encode()), len(prompt[:e].encode())) for s, e in spans]
    else:
        token_spans = [(_count(tokenizer, prompt[:s]), _count(tokenizer, prompt[:e])) for s, e in spans]
    return Example(
        task=task, prompt=prompt, answer=answer, length=count, requested_length=length,
        depth=depth, seed=seed, needle_chars=tuple(spans), needle_tokens=tuple(token_spans),
        context_chars=context_span, question=question, answer_prefix=answer_prefix,
        haystack=haystack.name, haystack_fingerprint=haystack.fingerprint,
        tokenizer_fingerprint=getattr(tokenizer, "fingerprint", repr(tokenizer)))


def make_examples(task, lengths, depths, num_per_cell: int = 1, seed: int = 0, tokenizer=None,
                  haystack: Haystack | str | None = None, qa_examples: bool = False) -> list[Example]:
    """A grid of examples: for each task x length x depth, `num_per_cell` examples with seeds
    seed, seed + 1, ... (so a seed's needle/story is shared across lengths and depths).
    `task` may be one name or a sequence of names; the haystack is loaded once per task."""
    tasks = (task,) if isinstance(task, str) else tuple(task)
    if num_per_cell < 1:
        raise ValueError(f"num_per_cell must be >= 1, got {num_per_cell}")
    tokenizer = tokenizer or ByteTokenizer()
    out = []
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
        stack = haystack if isinstance(haystack, Haystack) else get_haystack(haystack or DEFAULT_HAYSTACK[name])
        for length in lengths:
            for depth in depths:
                for i in range(num_per_cell):
                    out.append(make_example(name, length, depth, seed + i, tokenizer, stack, qa_examples))
    return out


__all__ = [
    "DEFAULT_HAYSTACK", "Example", "GENERATOR_VERSION", "NIAH_ANSWER_PREFIX", "NIAH_NEEDLE",
    "NIAH_TASKS", "NIAH_TEMPLATE", "QA_TASKS", "RULER_DEPTHS", "TASKS", "babilong_match",
    "example_key", "make_example", "make_examples", "niah_key_value", "score", "string_match_all",
]
