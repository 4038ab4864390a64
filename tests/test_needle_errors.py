"""experiments.needle_errors: the digit-level reading of S-NIAH answers."""

import json

import pytest

from experiments import needle_errors as ne


def row(answer, output, length=1024, seed=0):
    return {"key": f"niah_single_1/L{length}/d0.5/s{seed}", "task": "niah_single_1", "length": length,
            "answer": answer, "output": output}


def test_needle_shapes_and_keys():
    assert [ne.shape(n) for n in ("1234567", "1213456", "6976681")] == ["distinct", "repeated apart", "doubled"]
    # 6976681: the "6" before position 4 (0-based) also occurs at 0 and 3
    assert [i for i in range(7) if ne.ambiguous("6976681", i)] == [4, 5]
    assert ne.collision_digits("6976681", 4) == {"9"}          # "6" was followed by "9" at position 1
    assert ne.collision_digits("6976681", 5) == {"9", "6"}
    assert ne.collision_digits("6976681", 0) == set()
    assert ne.first_error("6976681", "6976688") == (6, "8")
    assert ne.first_error("6976681", "69766") == (5, "")
    assert ne.first_error("6976681", "6976681") is None
    assert ne.said_answer(" 6976688.\n") == "6976688" and ne.said_answer("") == ""


def test_analyse_counts_exact_hazard_and_first_errors():
    rows = [row("1234567", " 1234567."), row("6976681", " 6976981.", seed=1), row("1213456", " 1243456", seed=2)]
    result = ne.analyse(rows)
    assert result["exact"] == {"distinct": [1, 1], "doubled": [0, 1], "repeated apart": [0, 1]}
    # 6976681 -> 6976981: wrong at position 4 (ambiguous: "6" seen before), a collision ("9" followed "6")
    assert result["hazard"][(4, True)] == [0, 1]
    # 1213456 -> 1243456: wrong at position 2 (its previous digit "2" not seen before: not ambiguous)
    assert result["hazard"][(2, False)] == [2, 3]
    assert result["hazard"][(0, False)] == [3, 3]
    errors = result["errors"]
    assert errors["n"] == 2 and dict(errors["by_position"]) == {4: 1, 2: 1}
    assert errors["collision"] == 1 and errors["previous"] == 0 and errors["in_needle"] == 2
    # the next digits: "8" (given "9") and "3" (given "4"): no skip; chance 1/9 each
    assert errors["next"] == 0 and errors["chance_next"] == pytest.approx(2 / 9)
    # chance: 6976681 at 4 has one collision digit ("9" != "6"): 1/9; 1213456 at 2 has none
    assert errors["chance_collision"] == pytest.approx(1 / 9)
    # the previous digit: "6", the needle's own digit there (0/9); "2" (1/9)
    assert errors["chance_previous"] == pytest.approx(1 / 9)
    # the needles' other digits: {9, 7, 8, 1} (4/9) and {2, 3, 4, 5, 6} (5/9)
    assert errors["chance_in_needle"] == pytest.approx(9 / 9)


def test_run_directory_counts_each_example_once_and_bad_input_is_named(tmp_path, capsys):
    cache = tmp_path / "run" / "long_context"
    cache.mkdir(parents=True)
    shared = row("6976681", " 6976688.")
    (cache / "a.json").write_text(json.dumps({"results": [shared, row("1234567", " 1234567", seed=1),
                                                          row("2345678", " 8888", seed=2)]}))
    (cache / "b.json").write_text(json.dumps({"results": [shared]}))
    assert len(ne.load_rows(tmp_path / "run")) == 3
    text = ne.main([str(tmp_path / "run")])
    assert "| distinct | 50 [9, 91] (n=2) |" in text and "| doubled | 0 [0, 79] (n=1) |" in text
    assert "begin with '8': 1 (of 1)" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no long_context"):
        ne.main([str(tmp_path / "empty")])
    (tmp_path / "bad.json").write_text(json.dumps({"results": [{"answer": "1"}]}))
    with pytest.raises(SystemExit, match="not a list of evaluation rows"):
        ne.main([str(tmp_path / "bad.json")])
    (tmp_path / "other.json").write_text(json.dumps({"seconds": 1.0}))  # was a KeyError
    with pytest.raises(SystemExit, match="not a list of evaluation rows"):
        ne.main([str(tmp_path / "other.json")])


def test_needle_cue_files_give_their_uncued_answers(tmp_path):
    """experiments.needle_cue writes {"args", "seconds", "rows"} with a cue per row; only the rows
    with no digit given are the model's own answers (reading them used to raise KeyError)."""
    rows = [dict(row("6976681", " 6976861.", seed=s), cue=0) for s in range(2)]
    rows.append(dict(row("6976681", " 976681.", seed=0), cue=1))
    (tmp_path / "cue.json").write_text(json.dumps({"args": {}, "seconds": 1.0, "rows": rows}))
    assert ne.load_rows(tmp_path / "cue.json") == rows[:2]
    assert ne.analyse(rows[:2])["errors"]["n"] == 2
