"""experiments.qa_choice and StreamingRunner.continuation_logprobs: the model's choice among the
words a QA answer could be."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import qa_baselines as qb
from experiments import qa_choice as qc
from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context import harness
from titans_jax.long_context.haystacks import text_haystack
from titans_jax.long_context.tasks import example_story, make_example
from titans_jax.models import ModelConfig, TitansLM, init_params


def _runner(arch: str, window: int):
    config = ModelConfig().replace(dict(vocab_size=256, d_model=32, num_layers=1, num_heads=2, head_dim=16,
                                        mlp_hidden=48, window=16, segment_size=8, num_persistent=2,
                                        attention_block=8, arch=arch, **{"lmm.memory.chunk_size": 4}))
    model, params = TitansLM(config), init_params(config, jax.random.PRNGKey(1))
    return model, params, harness.StreamingRunner(model, params, window=window)


@pytest.fixture(scope="module")
def lmm():
    """(model, params, runner) of a tiny untrained LMM streaming windows of 32: one set of compiled
    programs for the tests below."""
    return _runner("lmm", window=32)


@pytest.mark.parametrize("arch", ["lmm", "transformer"])
def test_continuation_logprobs_are_those_of_one_parallel_pass(arch, lmm):
    """Streamed prompt (two windows of 32) + continuations fed from the shared cache,
    against the log-softmax of one parallel pass over prompt + continuation."""
    model, params, runner = lmm if arch == "lmm" else _runner(arch, window=32)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 256, 64).astype(np.int32)  # two windows
    continuations = [[5], [7, 8, 9], [7, 8, 200, 3]]  # one token; two sharing a prefix
    got = runner.continuation_logprobs(prompt, continuations)
    # one causal pass over the three rows padded to one length (the padding comes after what is read)
    longest = max(len(c) for c in continuations)
    ids = np.stack([np.concatenate([prompt, c, np.zeros(longest - len(c), np.int32)]) for c in continuations])
    logp = jax.nn.log_softmax(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(ids)), axis=-1)
    for row, (continuation, value) in enumerate(zip(continuations, got)):
        want = sum(float(logp[row, len(prompt) - 1 + i, token]) for i, token in enumerate(continuation))
        assert value == pytest.approx(want, abs=2e-4)
    with pytest.raises(ValueError, match="none of them empty"):
        runner.continuation_logprobs(prompt, [[1], []])
    with pytest.raises(ValueError, match=r"in \[0, 256\)"):
        runner.continuation_logprobs(prompt, [[256]])


def _row(task, seed, logprobs):
    item = example_story(task, seed)
    return {"task": task, "length": 1024, "seed": seed, "answer": item.answer,
            "words": list(qc.choice_words(task, seed)), "logprobs": logprobs}


def test_measures_of_a_reader_a_prior_and_a_formless_model():
    item = example_story("qa1", 4)
    words = list(qc.choice_words("qa1", 4))
    assert words == list(qb.KINDS["place"]) and item.answer in words
    prior = qc.kind_prior({"bedroom": 3, "garden": 1}, words)
    assert prior.sum() == pytest.approx(1) and prior[words.index("bedroom")] == pytest.approx(4 / 10)
    mentioned = qb.candidates(item)
    blind = np.full(6, 1 / 6)
    # a model sure of the gold word: right, 0 bits, all its mass on the story's words
    sure = qc.measures(_row("qa1", 4, [0.0 if w == item.answer else -50.0 for w in words]), prior, blind)
    assert sure["right"] == 1 and sure["bits"] == pytest.approx(0, abs=1e-9) and sure["story"] == pytest.approx(1)
    assert sure["kind"] == pytest.approx(1) and sure["last"] == pytest.approx(float(mentioned[-1] == item.answer))
    assert sure["prior_bits"] == pytest.approx(-math.log2(prior[words.index(item.answer)]))
    assert sure["gain"] == pytest.approx(sure["prior_bits"] - sure["bits"])
    assert sure["blind_story"] == pytest.approx(len(mentioned) / 6)
    assert sure["gold_last"] == float(mentioned[-1] == item.answer)
    assert sure["story_gain"] == pytest.approx(1 - len(mentioned) / 6)
    # the prior itself, written at a tenth of the probability: the prior's bits, kind 0.1
    copy = qc.measures(_row("qa1", 4, list(np.log(0.1 * prior))), prior, prior)
    assert copy["gain"] == pytest.approx(0) and copy["story_gain"] == pytest.approx(0)
    assert copy["kind"] == pytest.approx(0.1) and copy["right"] == float(item.answer == "bedroom")
    with pytest.raises(ValueError, match="6 words, 2 log-probs"):
        qc.measures(_row("qa1", 4, [0.0, 0.0]), prior, blind)


def _cell(reads: bool, n: int = 12):
    """qa1 rows of a model that puts most of its mass on the story's words (reads) or always the
    same skewed choice (blind)."""
    rows = []
    for seed in range(n):
        words, mentioned = list(qc.choice_words("qa1", seed)), qb.candidates(example_story("qa1", seed))
        fixed = [0.0, -1.0, -2.0, -0.5, -3.0, -1.5]
        rows.append(_row("qa1", seed, [(2.0 if w in mentioned else 0.0) if reads else f for w, f in zip(words, fixed)]))
    return rows


def test_summary_the_blind_control_and_the_report(tmp_path):
    blind = qc.summarise(_cell(reads=False), prior_examples=200)[("qa1", 1024)]
    assert blind["n"] == 12 and blind["story_gain"] == pytest.approx(0, abs=1e-12)  # its own mean: no gain
    assert blind["story_gain_95"] == pytest.approx(0, abs=1e-12)
    reads = qc.summarise(_cell(reads=True), prior_examples=200)[("qa1", 1024)]
    assert reads["story_gain"] > 0.1 and reads["story_gain"] - reads["story_gain_95"] > 0
    rows = []
    for seed in range(10):
        words = list(qc.choice_words("qa1", seed))
        gold = words.index(example_story("qa1", seed).answer)
        rows.append(_row("qa1", seed, [0.0 if (i == gold) == (seed < 7) else -9.0 for i in range(len(words))]))
    cell = qc.summarise(rows, prior_examples=200)[("qa1", 1024)]
    assert cell["n"] == 10 and cell["right"] == pytest.approx(0.7)
    not_last = [seed for seed in range(10) if qb.candidates(example_story("qa1", seed))[-1] != example_story(
        "qa1", seed).answer]
    assert 0 < cell["not_last_n"] == len(not_last) < 10  # both kinds of story among the ten
    assert cell["not_last_right"] == pytest.approx(np.mean([seed < 7 for seed in not_last]))
    assert cell["interval"][0] < 0.7 < cell["interval"][1]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"rows": rows}))
    text = qc.main(["--report", f"m={path}"])
    assert "| m | 1,024 | 10 | 70 [" in text and "**qa1**" in text
    with pytest.raises(ValueError, match="lacks"):
        qc.summarise([{k: v for k, v in rows[0].items() if k != "words"}])
    with pytest.raises(SystemExit):
        qc.main([])


def test_reach_split_and_the_distances_of_older_files(tmp_path, monkeypatch):
    """--reach splits each cell by the answer's distance from the question (the blind control over
    the whole cell); files scored before the distances were kept get them from their evaluation set."""
    near, far = _cell(reads=True, n=6), [row for row in _cell(reads=False, n=12) if row["seed"] >= 6]
    rows = [{**row, "answer_distance": 100} for row in near] + [{**row, "answer_distance": 500} for row in far]
    groups, _ = qc.cell_measures(rows, prior_examples=200)
    within = qc.mean_measures([m for row, m in groups[("qa1", 1024)] if row["answer_distance"] <= 381])
    farther = qc.mean_measures([m for row, m in groups[("qa1", 1024)] if row["answer_distance"] > 381])
    assert within["n"] == farther["n"] == 6 and within["story_gain"] > 0.1 > farther["story_gain"]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"args": {}, "rows": rows}))
    text = qc.main(["--report", f"m={path}", "--reach", "381"])
    lo, hi = within["interval"]
    assert (f"| m | qa1 | 1,024 | 6 | {100 * within['right']:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] | "
            f"{within['story_gain']:+.2f} ± {within['story_gain_95']:.2f} | 6 |") in text
    assert "| m | qa1 | 1,024 | 12 |" in qc.main(["--report", f"m={path}", "--reach", "1000"])
    assert text.count("0 | - | -") == 0 and "| 0 | - | - |" in qc.main(["--report", f"m={path}", "--reach", "1000"])
    for bad in (["--reach", "381"], ["--report", f"m={path}", "--reach", "-1"]):
        with pytest.raises(SystemExit):
            qc.main(bad)
    # an older file: its rows carry no distances; the evaluation set its args name gives them
    documents = [" ".join(f"Line {d} {i} of a quiet page." for i in range(300)) for d in range(4)]
    examples = [make_example("qa1", 1024, seed=seed, haystack=text_haystack("fixture", documents)) for seed in (0, 1)]
    source = [{**harness.example_row(e), "needle_chars": np.asarray(e.needle_chars),
               "needle_tokens": np.asarray(e.needle_tokens)} for e in examples]
    asked = []

    def fake_load(spec, tokenizer):
        asked.append(spec)
        return source

    monkeypatch.setattr("titans_jax.long_context.eval_sets.load_eval_set", fake_load)
    old = [{**_row("qa1", e.seed, [0.0] * 6), "answer": e.answer} for e in examples]
    args = {"tasks": "qa1", "lengths": "1024", "per_cell": 2, "seed": 0}
    filled = qc.with_distances(old, args)
    assert [row["answer_distance"] for row in filled] == [qc.fact_distances(row)["answer_distance"] for row in source]
    assert asked[0].depths == (None,) and asked[0].num_per_cell == 2 and asked[0].lengths == (1024,)
    assert qc.with_distances(filled, args) is filled and len(asked) == 1  # nothing to fill: no set built
    with pytest.raises(ValueError, match="not in the evaluation set"):
        qc.with_distances([{**old[0], "seed": 7}], args)


def test_scored_rows_are_the_harness_stories(lmm):
    """score_rows on an untrained model: one row per prompt, every word of the answer's kind (qa5:
    people or objects, as its question asks) scored, a non-qa row refused."""
    runner = lmm[2]
    documents = [" ".join(f"Line {d} {i} of a quiet page." for i in range(300)) for d in range(4)]
    haystack = text_haystack("fixture", documents)
    tokenizer = ByteTokenizer()
    examples = [make_example(task, 1024, seed=seed, haystack=haystack) for task in ("qa1", "qa5") for seed in (0, 1)]
    spans = [{"needle_chars": e.needle_chars, "needle_tokens": e.needle_tokens} for e in examples]
    rows = qc.score_rows(runner, [{**harness.example_row(e), **s} for e, s in zip(examples, spans)], tokenizer)
    for row, example in zip(rows, examples):
        assert row["answer"] == example.answer and row["words"] == list(qb.KINDS[qb.answer_kind(example.answer)])
        assert len(row["logprobs"]) == len(row["words"]) and all(v < 0 for v in row["logprobs"])
        # where the story ends and where its answer was last named, in bytes from the prompt's end (the
        # haystack's lines name no place or person: the sentence with the answer's last mention names it)
        context = example.prompt[:example.prompt.index("</context>")]
        naming_end = context.index(".", context.rindex(example.answer)) + 1
        assert row["answer_distance"] == len(example.prompt.encode()) - len(context[:naming_end].encode())
        assert 0 < row["story_distance"] <= row["answer_distance"]
    assert "answer_distance" not in qc.score_rows(runner, [harness.example_row(examples[0])], tokenizer)[0]
    niah = make_example("niah_single_1", 512, 0.5, 0, tokenizer)
    with pytest.raises(ValueError, match="scores the qa tasks"):
        qc.score_rows(runner, [harness.example_row(niah)], tokenizer)


def test_main_scores_a_run_and_writes_its_rows(tmp_path, monkeypatch):
    """The --run path of main (the model stubbed: test_scored_rows_are_the_harness_stories covers it)."""
    calls = []

    def fake_evaluate(run_dir, tasks, lengths, per_cell, seed, window, progress, depth, changes):
        calls.append((run_dir, tasks, lengths, per_cell, seed, window, progress, depth, changes))
        return [{**row, "depth": depth} for row in _cell(reads=True, n=per_cell)]

    monkeypatch.setattr(qc, "evaluate", fake_evaluate)
    run, out = tmp_path / "lc_x" / "lmm" / "seed0", tmp_path / "rows.json"
    text = qc.main(["--run", str(run), "--per-cell", "5", "--lengths", "1024", "--out", str(out), "--no-progress"])
    assert calls == [(str(run), ["qa1"], [1024], 5, 0, 4096, False, None, {})]
    assert "| lc_x/lmm/seed0 | 1,024 | 5 |" in text and len(json.loads(out.read_text())["rows"]) == 5
    text = qc.main(["--run", str(run), "--per-cell", "5", "--lengths", "1024", "--depth", "1", "--no-progress",
                    "--set", "model.lmm.memory.every_layer_floor=true"])
    assert calls[-1][-2:] == (1.0, {"lmm.memory.every_layer_floor": True})
    assert "| lc_x/lmm/seed0 | 1,024 (story at 1) | 5 |" in text
    rows = json.loads(out.read_text())["rows"]
    with pytest.raises(ValueError, match="different story depths"):  # one cell never pools two placements
        qc.summarise(rows + [{**row, "seed": row["seed"] + 100, "depth": 1.0} for row in rows])
    with pytest.raises(SystemExit):
        qc.main(["--run", str(run), "--depth", "1.5"])
    with pytest.raises(SystemExit):  # an intervention on the model only
        qc.main(["--run", str(run), "--set", "run.steps=3"])
    with pytest.raises(SystemExit):
        qc.main(["--run", str(run), "--per-cell", "0"])
    with pytest.raises(SystemExit):
        qc.main(["--report", "no-equals-sign"])


def test_greedy_among_the_words_pools_a_shared_first_letter():
    words = ["bathroom", "hallway", "kitchen", "garden", "office", "bedroom"]
    p = np.array([0.2, 0.25, 0.1, 0.1, 0.15, 0.2])  # b: 0.4 against the hallway's 0.25
    assert words[int(np.argmax(p))] == "hallway" and words[qc.greedy_pick(words, p)] in ("bathroom", "bedroom")
    assert words[qc.greedy_pick(words, np.array([0.2, 0.25, 0.1, 0.1, 0.15, 0.21]))] == "bedroom"
    assert qc.greedy_pick(["ab", "abc"], np.array([0.6, 0.4])) == 0  # a word ending before another


def test_a_run_with_another_tokenizer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config": {"data": {"tokenizer": "bpe"}}}))
    with pytest.raises(SystemExit, match="bpe tokenizer; qa_choice scores byte-level runs"):
        qc.evaluate(str(tmp_path), ["qa1"], [1024], 1, 0, 4096, False)
    with pytest.raises(SystemExit, match="qa_choice scores the qa tasks"):
        qc.evaluate(str(tmp_path), ["niah_single_1"], [1024], 1, 0, 4096, False)
