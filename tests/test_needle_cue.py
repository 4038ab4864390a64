"""experiments.needle_cue: a needle's first digits given after the prompt, the rest read."""

import json

import jax
import pytest

from experiments import needle_cue as nc
from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context import harness, make_examples
from titans_jax.models import ModelConfig, TitansLM, init_params


def test_cued_prompts_and_their_scores():
    assert nc.cued_prompt("... text is", "6976681", 0) == "... text is"
    assert nc.cued_prompt("... text is", "6976681", 2) == "... text is 69"
    with pytest.raises(ValueError, match=r"cue must be in \[0, 7\)"):
        nc.cued_prompt("p", "6976681", 7)
    right = nc.continuation_row("niah_single_1", "6976681", 1, "976681.\n")
    assert right["exact"] == 1.0 and right["in_place"] == 1.0
    # a space after the cue breaks the number: not the needle, and no digit of the rest in place
    spaced = nc.continuation_row("niah_single_1", "6976681", 1, " 976681.\n")
    assert spaced["exact"] == 0.0 and spaced["in_place"] == 0.0
    half = nc.continuation_row("niah_single_1", "6976681", 1, "970000.\n")   # 9, 7 of the six after the cue
    assert half["exact"] == 0.0 and half["in_place"] == pytest.approx(2 / 6)
    plain = nc.continuation_row("niah_single_1", "6976681", 0, " 6976681.\n")
    assert plain["exact"] == 1.0 and plain["in_place"] == 1.0
    # a UUID (niah_single_3): RULER's match and the characters in place ignore case
    uuid = "3f2a9c1e-07b4-4d2e-9a1b-5c6d7e8f9a0b"
    upper = nc.continuation_row("niah_single_3", uuid, 1, "F2A9C1E-07B4-4D2E-9A1B-5C6D7E8F9A0B.\n")
    assert upper["exact"] == 1.0 and upper["in_place"] == 1.0
    cut = nc.continuation_row("niah_single_3", uuid, 0, " 3f2a9c1e-07b4.\n")   # its first 13 of 36 characters
    assert cut["exact"] == 0.0 and cut["in_place"] == pytest.approx(13 / 36)


def test_no_cue_is_the_plain_evaluation():
    config = ModelConfig().replace(dict(vocab_size=256, d_model=32, num_layers=1, num_heads=2, head_dim=16,
                                        mlp_hidden=48, window=16, segment_size=8, num_persistent=2,
                                        attention_block=8, arch="lmm", **{"lmm.memory.chunk_size": 4}))
    model, params = TitansLM(config), init_params(config, jax.random.PRNGKey(0))
    runner, tokenizer = harness.StreamingRunner(model, params, window=64), ByteTokenizer()
    examples = make_examples("niah_single_1", (400,), (0.5,), 2, 0, tokenizer)
    plain = harness.evaluate_rows(runner, [harness.example_row(e) for e in examples], tokenizer, progress=False)
    rows = nc.cue_rows(runner, examples, (0, 1), tokenizer)
    assert [r["output"] for r in rows if r["cue"] == 0] == [r["output"] for r in plain]
    assert [r["exact"] for r in rows if r["cue"] == 0] == [r["score"] for r in plain]
    assert [r["cue"] for r in rows] == [0, 1, 0, 1] and all(r["answer"] == e.answer for r, e in
                                                             zip(rows[::2], examples))
    assert "| 0 | " in nc.report(rows) and "(n=2)" in nc.report(rows)


def test_main_evaluates_a_run_and_writes_its_rows(tmp_path, monkeypatch):
    """The --run path of main (the model's evaluation stubbed: test_no_cue_is_the_plain_evaluation covers it)."""
    (tmp_path / "config.json").write_text("{}")
    calls = []

    def fake_run(run_dir, task, lengths, depth, per_cell, seed, cues, window, progress=False, changes=None):
        calls.append((run_dir, task, lengths, depth, per_cell, seed, cues, window, changes))
        return [{"cue": cue, "length": n, "exact": float(i == 0), "in_place": 1.0, "depth": depth}
                for n in lengths for i in range(per_cell) for cue in cues]

    monkeypatch.setattr(nc, "run", fake_run)
    out = tmp_path / "rows.json"
    text = nc.main(["--run", str(tmp_path), "--lengths", "1024,4096", "--per-cell", "2", "--cues", "0",
                    "--depth", "0.1", "--no-progress", "--out", str(out)])
    assert calls == [(tmp_path, "niah_single_1", (1024, 4096), 0.1, 2, 0, (0,), 4096, {})]
    assert "depth 0.1, seeds 0..1\n" in text and "| 0 | 50 [9, 91] / 100 (n=2) | 50 [9, 91] / 100 (n=2) |" in text
    written_rows = json.loads(out.read_text())
    assert written_rows["args"]["depth"] == 0.1 and len(written_rows["rows"]) == 4
    # an evaluation-time change of the model config: parsed, passed on, named in the report and the file
    text = nc.main(["--run", str(tmp_path), "--per-cell", "1", "--cues", "0", "--no-progress", "--out", str(out),
                    "--set", "model.lmm.memory.every_layer_floor=true"])
    assert calls[-1][-1] == {"lmm.memory.every_layer_floor": True}
    assert "seeds 0..0, evaluated with model.lmm.memory.every_layer_floor=true" in text
    assert json.loads(out.read_text())["args"]["set"] == ["model.lmm.memory.every_layer_floor=true"]
    with pytest.raises(SystemExit):
        nc.main(["--run", str(tmp_path), "--set", "lmm.theta_max=1"])
    nc.main(["--run", str(tmp_path), "--task", "niah_single_3", "--per-cell", "1", "--cues", "0", "--no-progress"])
    assert calls[-1][1] == "niah_single_3"   # UUIDs in the essays


def _cue_file(per_cell, exact_by_length):
    rows = [{"cue": 0, "length": length, "exact": float(right), "in_place": 1.0 if right else 0.5}
            for length, results in exact_by_length.items() for right in results]
    return {"args": {"task": "niah_single_1", "depth": 0.5, "per_cell": per_cell, "seed": 0, "window": 4096}, "rows": rows}


def test_combine_gives_each_run_and_the_spread_over_runs(tmp_path):
    a = _cue_file(4, {1024: [1, 1, 1, 0], 4096: [1, 0, 0, 0]})
    b = _cue_file(4, {1024: [1, 1, 0, 0], 4096: [0, 0, 0, 0]})
    text = nc.combine({"a.json": a, "b.json": b})
    assert "| a.json | 0 | 75 [30, 95] / 88 | 25 [5, 70] / 62 |" in text
    # mean ± sd (ddof 1) of 75 and 50, of 25 and 0; digits 87.5 and 75 -> 81 ± 9, 62.5 and 50 -> 56 ± 9
    assert "| mean ± sd over runs | 0 | 62 ± 18 / 81 ± 9 (2 runs) | 12 ± 18 / 56 ± 9 (2 runs) |" in text
    paths = []
    for name, contents in (("a.json", a), ("b.json", b), ("c.json", _cue_file(2, {1024: [1, 0]}))):
        (tmp_path / name).write_text(json.dumps(contents))
        paths.append(str(tmp_path / name))
    assert nc.main(["--combine", *paths[:2]]) == text
    # a mean over different evaluations would mix two measurements: refused, naming the difference
    with pytest.raises(SystemExit, match="not evaluated alike: per_cell 2 vs 4"):
        nc.main(["--combine", *paths])
    with pytest.raises(ValueError, match="two or more"):
        nc.combine({"a.json": a})
    with pytest.raises(ValueError, match="not a needle_cue --out file"):
        nc.combine({"a.json": a, "x.json": {"rows": []}})
    with pytest.raises(SystemExit, match="given twice"):
        nc.main(["--combine", paths[0], paths[0]])
    (tmp_path / "other").mkdir()   # two files of one name: told apart by their paths
    (tmp_path / "other" / "a.json").write_text(json.dumps(b))
    assert f"| {paths[0]} | 0 | 75 [30, 95]" in nc.main(["--combine", paths[0], str(tmp_path / "other" / "a.json")])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="cannot read"):
        nc.main(["--combine", paths[0], str(tmp_path / "bad.json")])
    assert "% of the digits after the cue in place" in text
    uuids = {name: {**c, "args": dict(c["args"], task="niah_single_3")} for name, c in (("a", a), ("b", b))}
    assert "% of the characters after the cue in place" in nc.combine(uuids)  # a UUID's are not all digits


def evaluated(run, length, per_cell, right, seed=0, depth=0.5, task="niah_single_1"):
    """A needle_cue --out file of `run` at one length: `right` of its `per_cell` uncued rows exact (the
    needle of evaluation seed s is "s" at every length and depth)."""
    rows = [{"cue": cue, "length": length, "exact": float(i < right), "in_place": 1.0, "answer": str(seed + i)}
            for i in range(per_cell) for cue in (0, 1)]
    return {"args": {"run": run, "task": task, "depth": depth, "per_cell": per_cell, "seed": seed,
                     "window": 4096}, "rows": rows}


def written(tmp_path, files):
    for name, contents in files.items():
        (tmp_path / name).write_text(json.dumps(contents))
    return [str(tmp_path / name) for name in files]


def test_curves_join_one_models_files_by_length(tmp_path):
    files = {"a.json": evaluated("runs/x", 1024, 4, 3), "b.json": evaluated("runs/x", 2_097_152, 2, 0),
             "c.json": evaluated("runs/y", 1024, 4, 1), "d.json": evaluated("runs/x", 1024, 4, 4, seed=4)}
    curves = nc.length_curves(files)
    # the cued rows are left out; other evaluation seeds at one length are pooled
    assert curves == {("runs/x", "niah_single_1", 0.5): {1024: [1.0] * 3 + [0.0] + [1.0] * 4, 2_097_152: [0.0] * 2},
                      ("runs/y", "niah_single_1", 0.5): {1024: [1.0, 0.0, 0.0, 0.0]}}
    table = nc.curves_table(curves)
    assert "| runs/x | niah_single_1 | 0.5 | 88 [53, 98] (n=8) | 0 [0, 66] (n=2) |" in table
    assert "| runs/y | niah_single_1 | 0.5 | 25 [5, 70] (n=4) |  |" in table
    with pytest.raises(ValueError, match="e.json and a.json both evaluate runs/x at 1,024 tokens on the same"):
        nc.length_curves({**files, "e.json": evaluated("runs/x", 1024, 2, 0, seed=2)})
    paths = written(tmp_path, files)
    assert nc.main(["--curves", str(tmp_path / "curves.png"), *paths]) == table
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="--curves needs needle_cue --out files"):
        nc.main(["--curves", str(tmp_path / "curves.png")])
    with pytest.raises(SystemExit, match="go with --curves, --heatmap or --combine"):
        nc.main(["--run", "runs/x", paths[0]])


def test_heatmap_lays_one_models_depths_against_lengths(tmp_path):
    files = {"d1.json": evaluated("runs/x", 1024, 4, 4, depth=0.1),
             "d1_64k.json": evaluated("runs/x", 65536, 2, 1, depth=0.1),
             "d9.json": evaluated("runs/x", 1024, 4, 0, depth=0.9), "d5.json": evaluated("runs/x", 65536, 2, 2)}
    table = nc.depth_table(nc.length_curves(files))
    lines = table.splitlines()
    assert lines[0] == "runs/x, niah_single_1: exact % [Wilson 95%] (examples), uncued"
    assert lines[2] == "| depth | 1,024 | 65,536 |"
    # depths in order, a cell left empty where that depth was not evaluated at that length
    assert lines[4:] == ["| 0.1 | 100 [51, 100] (n=4) | 50 [9, 91] (n=2) |", "| 0.5 |  | 100 [34, 100] (n=2) |",
                         "| 0.9 | 0 [0, 49] (n=4) |  |"]
    paths = written(tmp_path, files)
    # needles by their answer: "a" exact in all four cells, "b" in none, "c" in one; "d" is not in every cell
    consistent = {(0.1, 1024): "abcd", (0.9, 1024): "abc", (0.1, 4096): "abc", (0.9, 4096): "abc"}
    rows_of = {key: [{"cue": cue, "length": key[1], "answer": needle, "in_place": 1.0,
                      "exact": float(needle == "a" or (needle == "c" and key == (0.1, 1024)))}
                     for needle in needles for cue in (0, 1)] for key, needles in consistent.items()}
    needles = {f"{key}": {"args": {"depth": key[0]}, "rows": rows} for key, rows in rows_of.items()}
    assert nc.needle_consistency(needles) == ("3 needles evaluated in all 4 cells: 1 exact in every cell, 1 in none, "
                                              "1 in some\n")
    # the files above: evaluation seeds 0 and 1 are in all four cells, each exact in some
    text = nc.main(["--heatmap", str(tmp_path / "heat.png"), *paths])
    assert text == table + "\n2 needles evaluated in all 4 cells: 0 exact in every cell, 0 in none, 2 in some\n"
    assert (tmp_path / "heat.png").stat().st_size > 0
    other_run = written(tmp_path, {"y.json": evaluated("runs/y", 1024, 4, 1)})
    with pytest.raises(SystemExit, match=r"one model on one task; the files hold runs/x \(niah_single_1\), runs/y"):
        nc.main(["--heatmap", str(tmp_path / "h2.png"), *paths, *other_run])
    other_task = written(tmp_path, {"n.json": evaluated("runs/x", 1024, 4, 1, task="niah_single_2")})
    with pytest.raises(SystemExit, match="niah_single_1.*niah_single_2"):
        nc.main(["--heatmap", str(tmp_path / "h3.png"), *paths, *other_task])
    with pytest.raises(SystemExit, match="--heatmap needs needle_cue --out files"):
        nc.main(["--heatmap", str(tmp_path / "h4.png")])


def test_uuid_digits_compare_the_answers_with_their_uuids_digits_and_anothers(tmp_path):
    """needle_cue --uuid-digits: a 7-digit answer against a UUID's digits (letters dropped), with the
    next example's UUID as chance."""
    first, second = "3f2a9c1e-07b4-4d2e-9a1b-5c6d7e8f9a0b", "a1b2c3d4-e5f6-0718-293a-4b5c6d7e8f90"
    assert nc.digits_in_place(" 3291074.\n", first) == 1.0   # 3, 2, 9, 1, 0, 7, 4: its digits in order
    assert nc.digits_in_place(" 3290000.\n", first) == pytest.approx(4 / 7)
    assert nc.digits_in_place("\n", first) == 0.0 and nc.digits_in_place(" 1234560.\n", second) == 1.0
    rows = [{"cue": 0, "length": 1024, "answer": first, "output": " 3291074.\n", "exact": 0.0},
            {"cue": 0, "length": 1024, "answer": second, "output": " 12345.\n", "exact": 0.0}]
    path = tmp_path / "uuid.json"
    path.write_text(json.dumps({"args": {"task": "niah_single_3", "run": "runs/m"}, "rows": rows}))
    # own: 1.0 and 1.0; chance: 3291074 against the second's 1234560718... (the 2: 1/7), 12345 against
    # the first's 3291074... (the 2: 1/5); one answer of two has 7 digits
    assert "| runs/m | 1,024 | 0 | 50 | 1.00 | 0.17 |" in nc.main(["--uuid-digits", str(path)])
    path.write_text(json.dumps({"args": {"task": "niah_single_1", "run": "runs/m"}, "rows": rows}))
    with pytest.raises(SystemExit, match="not a needle_cue --out file of niah_single_3"):
        nc.main(["--uuid-digits", str(path)])
    path.write_text(json.dumps({"args": {"task": "niah_single_3", "run": "runs/m"}, "rows": rows[:1]}))
    with pytest.raises(SystemExit, match="1 uncued row at 1024: chance needs another UUID"):
        nc.main(["--uuid-digits", str(path)])


def test_uuid_groups_find_where_the_copy_breaks(tmp_path):
    """needle_cue --uuid-groups: characters in place by the UUID's groups, the UUID-shaped answers,
    and the later groups that begin as another of the UUID's groups; cued rows are left out."""
    uuid, other = "3f2a9c1e-07b4-4d2e-9a1b-5c6d7e8f9a0b", "a1b2c3d4-e5f6-4718-893a-4b5c6d7e8f90"
    # groups 2 and 4 swapped (each begins as the other's), group 5 wrong and short: not UUID-shaped
    swapped = " 3F2A9C1E-9a1b-4d2e-07b4-0000.\n"
    assert nc.group_figures(swapped, uuid) == (False, [1.0, 0.0, 1.0, 0.0, 0.0], 2, 4)
    assert nc.group_figures(f" {uuid}.\n", uuid) == (True, [1.0] * 5, 0, 4)
    assert nc.group_figures(" 3291074.\n", uuid) == (False, [0.125, 0.0, 0.0, 0.0, 0.0], 0, 0)
    # a group that begins as its own group is in place, even where another group begins alike
    assert nc.group_figures(" aaaa0000-aaaa.\n", "aaaa0000-aaaa-4d2e-9a1b-5c6d7e8f9a0b")[2:] == (0, 1)
    rows = [{"cue": 0, "length": 1024, "answer": uuid, "output": f" {uuid}.\n", "exact": 1.0},
            {"cue": 0, "length": 1024, "answer": uuid, "output": swapped, "exact": 0.0},
            {"cue": 1, "length": 1024, "answer": uuid, "output": " 0000.\n", "exact": 0.0},
            {"cue": 0, "length": 4096, "answer": uuid, "output": f" {uuid}.\n", "exact": 1.0},
            {"cue": 0, "length": 4096, "answer": other, "output": " 0000.\n", "exact": 0.0}]
    path = tmp_path / "uuid.json"
    path.write_text(json.dumps({"args": {"task": "niah_single_3", "run": "runs/m"}, "rows": rows}))
    # in place: 36 / 36 and 16 / 36 (groups 1 and 3 and the four dashes); later groups: 2 jumped of 4 + 4
    table = nc.main(["--uuid-groups", str(path)])
    # one UUID at 1K: chance is its own figure
    assert "| runs/m | 1,024 | 50 | 50 | 72 | 72 | 100 / 50 / 100 / 50 / 50 | 25 (n=8) |" in table
    # chance: the exact answer against the other UUID has its dashes and version 4 in place (5 / 36), "0000" none
    assert "| runs/m | 4,096 | 50 | 50 | 50 | 7 | 50 / 50 / 50 / 50 / 50 | 0 (n=4) |" in table
    path.write_text(json.dumps({"args": {"task": "niah_single_2", "run": "runs/m"}, "rows": rows}))
    with pytest.raises(SystemExit, match="not a needle_cue --out file of niah_single_3"):
        nc.main(["--uuid-groups", str(path)])
