"""experiments.qa_baselines: the readers that skip the QA tasks' reasoning."""

import json

import pytest

from experiments import qa_baselines as qb
from titans_jax.long_context import babilong
from titans_jax.long_context.haystacks import text_haystack
from titans_jax.long_context.tasks import example_answer, example_story, make_example


def test_candidates_are_the_answers_kind_in_order_of_last_mention_without_the_questions():
    item = babilong.Story("qa1", ("Mary went to the kitchen.", "John moved to the office.",
                                  "Mary travelled to the garden.", "John went back to the kitchen."),
                          "Where is Mary?", "garden")
    assert qb.candidates(item) == ["office", "garden", "kitchen"]
    item = babilong.Story("qa4", ("The office is north of the kitchen.", "The kitchen is north of the garden."),
                          "What is north of the kitchen?", "office")
    assert qb.candidates(item) == ["office", "garden"]  # the question's place is no candidate
    item = babilong.Story("qa5", ("Mary picked up the milk.", "Mary gave the milk to Fred."),
                          "What did Mary give to Fred?", "milk")
    assert qb.answer_kind(item.answer) == "object" and qb.candidates(item) == ["milk"]


def test_the_stories_are_the_harness_ones_and_the_readers_score_what_they_should():
    documents = [" ".join(f"Line {d} {i} of a quiet page." for i in range(300)) for d in range(4)]
    haystack = text_haystack("fixture", documents)
    for task in babilong.QA_TASKS:
        example, item = make_example(task, 2048, seed=3, haystack=haystack), example_story(task, 3)
        at = [example.prompt.index(fact) for fact in item.facts]  # the harness's prompt tells this story
        assert at == sorted(at) and item.question in example.prompt and example.answer == item.answer
    with pytest.raises(ValueError, match="'niah_single_1' has no story"):
        example_story("niah_single_1", 0)
    rows = qb.main(["--examples", "200"])
    for task, row in rows.items():
        assert row["answer_mentioned"] == 1.0  # every answer is a word of the story
        assert row["prior"] == pytest.approx(sum(example_answer(task, s) == row["prior_answer"]
                                                 for s in range(200)) / 200)
        assert 0 < row["prior"] < row["mentioned"] <= 1 and 0 < row["last"] < 1
    assert rows["qa4"]["mentioned"] == 0.5  # two places in the story but the question's: a coin toss
    with pytest.raises(SystemExit):
        qb.main(["--tasks", "qa6"])


def test_models_are_put_beside_the_readers_on_their_own_stories(tmp_path, capsys):
    def row(task, seed, length, said):
        answer = example_answer(task, seed)
        return {"task": task, "seed": seed, "length": length, "output": f" {said}.\n",
                "score": float(said.lower() == answer.lower())}

    last = {seed: qb.candidates(example_story("qa1", seed))[-1] for seed in range(4)}
    rows = [row("qa1", seed, length, last[seed]) for seed in range(4) for length in (1024, 4096)]
    rows[-1] = row("qa1", 3, 4096, example_answer("qa1", 3))  # one answer right whatever the last word
    rows.append({"task": "niah_single_1", "seed": 0, "length": 1024, "output": " 1.\n", "score": 0.0})  # ignored
    path = tmp_path / "results.json"
    path.write_text(json.dumps(rows))
    summary = qb.main(["--results", f"m={path}"])
    expected = sum(last[seed] == example_answer("qa1", seed) for seed in range(4)) / 4
    assert summary[("m", "qa1", 1024)] == {"accuracy": expected, "n": 4, "answers_last": 1.0}
    assert summary[("m", "qa1", 4096)]["answers_last"] == (3 + (last[3] == example_answer("qa1", 3))) / 4
    out = capsys.readouterr().out
    assert f"| reader: last mentioned | {100 * expected:.0f} | {100 * expected:.0f} |" in out
    assert "**qa1** (4 stories;" in out and "**niah" not in out
    path.write_text(json.dumps([{"task": "qa1"}]))
    for bad, message in [("m", "takes NAME=JSON"), (f"m={tmp_path / 'none.json'}", "none.json does not exist"),
                         (f"m={path}", "is not an experiments.long_context results.json")]:
        with pytest.raises(SystemExit):
            qb.main(["--results", bad])
        assert message in capsys.readouterr().err
