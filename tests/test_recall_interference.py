import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recall_interference
from experiments.recall_interference import FILLERS, PERIOD, filler_tokens, fixed_filler_row, measure
from experiments.recall_probe import PAIR, TextFiller


def test_rows_differ_only_in_their_filler_and_mark_every_query_at_its_distance():
    length, pairs = 300, 5
    rows = {kind: fixed_filler_row(11, 2, length, pairs, kind) for kind in FILLERS}
    for kind, (ids, mask, distance) in rows.items():
        assert ids.shape == (2 * PAIR * pairs + length,) and mask.shape == distance.shape == (len(ids) - 1,)
        text = bytes(ids.tolist())
        stored = {text[i:i + 2]: text[i + 3:i + 4] for i in range(0, pairs * PAIR, PAIR)}
        answered = {}
        for t in np.flatnonzero(mask):
            assert text[t:t + 1] == b":" and t >= pairs * PAIR + length
            key = text[t - 2:t]
            answered[key] = text[t + 1:t + 2]
            assert text.index(key + b":") + 3 + distance[t] == t + 1
            assert length + 1 <= distance[t] <= length + 2 * PAIR * pairs - PAIR + 1
        assert answered == stored and len(stored) == pairs
        assert not distance[~mask].any()
    reference = rows["digits"][0]
    for kind, (ids, mask, distance) in rows.items():  # paired: the same pairs and queries, another filler
        np.testing.assert_array_equal(ids[:pairs * PAIR], reference[:pairs * PAIR])
        np.testing.assert_array_equal(ids[-pairs * PAIR:], reference[-pairs * PAIR:])
        np.testing.assert_array_equal(distance, rows["digits"][2])


def test_filler_kinds_hold_the_stated_number_of_distinct_windows():
    rng = np.random.default_rng(0)
    windows = {}
    for kind in FILLERS:
        tokens = filler_tokens(kind, 4096, rng)
        assert tokens.dtype == np.int32 and set(tokens.tolist()) <= set(b"0123456789")
        windows[kind] = len({tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3)})
    assert windows["constant"] == 1 and windows["binary"] == 16
    assert windows["periodic"] <= PERIOD and windows["digits"] > 3000
    with pytest.raises(ValueError, match="unknown filler kind"):
        filler_tokens("nonsense", 8, rng)


def test_text_fillers_are_windows_of_their_text_paired_with_the_digit_rows(monkeypatch):
    source = TextFiller.from_text("books", "Thus: the king's men, all of them; and so on. " * 40)
    monkeypatch.setattr(recall_interference, "text_filler", {"books": source, "noise": TextFiller.from_text(
        "noise", "The grass is green.\n", repeating=True)}.__getitem__)
    length, pairs = 300, 5
    digits = fixed_filler_row(11, 2, length, pairs, "digits")
    for kind in ("books", "noise"):
        ids, mask, distance = fixed_filler_row(11, 2, length, pairs, kind)
        np.testing.assert_array_equal(ids[:pairs * PAIR], digits[0][:pairs * PAIR])
        np.testing.assert_array_equal(ids[-pairs * PAIR:], digits[0][-pairs * PAIR:])
        np.testing.assert_array_equal(mask, digits[1])
        np.testing.assert_array_equal(distance, digits[2])
        filler = bytes(ids[pairs * PAIR:-pairs * PAIR].tolist())
        assert len(filler) == length and b":" not in filler
        assert filler in (bytes(source.data.tolist()) if kind == "books" else b"The grass is green.\n" * 40)
    np.testing.assert_array_equal(fixed_filler_row(11, 2, length, pairs, "books")[0],
                                  fixed_filler_row(11, 2, length, pairs, "books")[0])


class _Oracle:
    """A stand-in model that recalls by lookup: at a ':' preceded by a key, the value after the
    key's first occurrence, if that lies within `reach` tokens (else a wrong letter)."""

    def __init__(self, reach):
        self.reach = reach

    def apply(self, variables, ids):
        length = ids.shape[1]
        t = jnp.arange(length)
        key_a, key_b = jnp.roll(ids, 2, 1), jnp.roll(ids, 1, 1)
        same = (key_a[:, :, None] == key_a[:, None, :]) & (key_b[:, :, None] == key_b[:, None, :])
        earlier = (t[None, :] < t[:, None]) & (t[:, None] - t[None, :] <= self.reach) & (t[None, :] >= 2)
        found = same & earlier[None] & (ids[:, None, :] == ord(":"))
        first = jnp.argmax(found, -1)
        value = jnp.take_along_axis(jnp.pad(ids, ((0, 0), (0, 1)))[:, 1:], first, 1)
        answer = jnp.where(found.any(-1), value, ord("?"))
        return jnp.eye(256)[answer]


def test_measure_counts_recall_by_filler_length(capsys):
    perfect = measure(_Oracle(10**6), {}, ["digits", "constant"], [0, 100], rows=3, batch=2, num_pairs=4,
                      stream_window=0)
    for cells in perfect.values():
        assert all(cell["accuracy"] == 1.0 and cell["count"] == 12 for cell in cells.values())
    short = measure(_Oracle(60), {}, ["binary"], [0, 100], rows=3, batch=2, num_pairs=4, stream_window=0)
    assert short["binary"]["0"]["accuracy"] == 1.0 and short["binary"]["100"]["accuracy"] == 0.0
    assert "binary filler of" in capsys.readouterr().out


def test_bad_arguments_are_refused(tmp_path, capsys):
    for argv in (["--quick", "--fillers", "nonsense"], ["--quick", "--fillers", "books:nosplit"],
                 ["--quick", "--fillers-lengths", "1k"], ["--quick", "--rows", "0"],
                 [], ["--runs", str(tmp_path)], ["--quick", "--eval-set", "lmm.memory.norm_eps"],
                 ["--quick", "--eval-set", "lmm.nothing=1"]):
        with pytest.raises(SystemExit):
            recall_interference.main(argv)
    assert "no recall.json" in capsys.readouterr().err


def test_merging_keeps_what_an_earlier_measurement_of_the_same_run_had():
    cell = {"correct": 1, "count": 2, "accuracy": 0.5, "ci95": [0.1, 0.9], "seconds": 1.0}
    earlier = {"lmm seed 0": {"params_digest": "a", "recall": {"digits": {"1024": cell, "65536": cell}},
                              "mechanism": {"digits": {"m": {}}}}}
    again = {"lmm seed 0": {"params_digest": "a", "recall": {"digits": {"1024": {**cell, "correct": 2}},
                                                             "constant": {"1024": cell}}}}
    merged = recall_interference.merge_results(earlier, again)["lmm seed 0"]
    assert set(merged["recall"]["digits"]) == {"1024", "65536"} and merged["recall"]["digits"]["1024"]["correct"] == 2
    assert "constant" in merged["recall"] and merged["mechanism"] == {"digits": {"m": {}}}
    retrained = {"lmm seed 0": {"params_digest": "b", "recall": {"constant": {"1024": cell}}}}
    assert recall_interference.merge_results(earlier, retrained) == retrained


def test_runs_of_one_variant_and_seed_with_other_settings_get_other_names():
    plain = {"variant": "ttt", "seed": 0}
    small = {"variant": "ttt", "seed": 0, "set": ["model.lmm.theta_max=0.003"]}
    assert recall_interference.entry_name(plain, []) == "ttt seed 0"
    assert recall_interference.entry_name(small, []) == "ttt seed 0 [lmm.theta_max=0.003]"
    on_books = {**small, "filler": "books:train"}
    assert recall_interference.entry_name(on_books, []) == "ttt seed 0 [lmm.theta_max=0.003, filler books:train]"
    longer = {**on_books, "seq_len": 1024, "batch": 8, "pairs": 8}  # other rows: another run, another name
    assert recall_interference.entry_name(longer, []) == (
        "ttt seed 0 [1024-token rows, batch 8, lmm.theta_max=0.003, filler books:train]")
    assert recall_interference.entry_name(small, ["lmm.memory.norm_eps=1e-12"]) == (
        "ttt seed 0 [lmm.theta_max=0.003] (lmm.memory.norm_eps=1e-12)")


def test_mechanism_sees_a_learnt_filler_write_less():
    import jax

    from titans_jax.models import ModelConfig, TitansLM

    model = TitansLM(ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2, arch="lmm", segment_size=16,
                                 window=16))
    ids = fixed_filler_row(0, 0, 8, 4, "digits")[0]
    params = model.init(jax.random.key(0), ids[None, :-1])["params"]
    report = recall_interference.mechanism(model, params, ["constant", "digits"], 64, 2, 4, horizons=(10, 1000))
    (layer,) = report["constant"]
    for kind in ("constant", "digits"):
        cell = report[kind][layer]
        assert 0 < cell["alpha"] < 1 and 1 > cell["keep"]["10"] > cell["keep"]["1000"] > 0 and cell["theta"] > 0
    assert report["constant"][layer]["surprise"] < report["digits"][layer]["surprise"]
    pairs = report["digits"][layer]["pairs"]
    assert pairs["theta"] > 0 and pairs["surprise"] > 0 and pairs["write"] > 0
    for kind in ("constant", "digits"):  # per head: two heads whose mean is the layer's figure
        cell = report[kind][layer]
        heads = cell["heads"]
        assert all(len(values) == 2 for values in (heads["theta"], heads["write"], heads["alpha"]))
        np.testing.assert_allclose([np.mean(heads["theta"]), np.mean(heads["write"]), np.mean(heads["alpha"]),
                                    np.mean(heads["keep"]["1000"])],
                                   [cell["theta"], cell["write"], cell["alpha"], cell["keep"]["1000"]], rtol=1e-12)
        np.testing.assert_allclose(np.mean(heads["pairs_write"]), cell["pairs"]["write"], rtol=1e-12)
    assert report["digits"][layer]["heads"]["alpha"][0] != report["digits"][layer]["heads"]["alpha"][1]
    table = recall_interference.heads_table({"r": {"mechanism": report}})
    assert table.count("\n| r | block_0 | digits | ") == 2
    assert recall_interference.heads_table({"r": {"mechanism": {"digits": {"m": {"theta": 1}}}}}) == ""


def test_show_prints_both_tables_of_a_results_file(tmp_path, capsys):
    cell = {"correct": 48, "count": 64, "accuracy": 0.75, "ci95": [0.63, 0.84], "seconds": 1.0}
    mech = {"theta": 0.01, "surprise": 2.5, "write": 0.0035, "alpha": 1.3e-6,
            "keep": {"16384": 0.98, "65536": 0.92, "262144": 0.72}}
    results = {"lmm seed 0": {"params_digest": "a", "recall": {"digits": {"65536": cell}},
                              "mechanism": {"digits": {"block_0/memory": mech}, "constant": {"block_0/memory": {
                                  "theta": 0.01, "surprise": 3e-5, "write": 3e-8,
                                  "pairs": {"theta": 0.02, "surprise": 2.5, "write": 0.05}}}}}}
    path = tmp_path / "interference.json"
    path.write_text(recall_interference.json.dumps(results))
    assert recall_interference.main(["--show", str(path)]) == results
    out = capsys.readouterr().out
    assert "| lmm seed 0 | digits | 0.75 [0.63, 0.84] |" in out
    assert "| lmm seed 0 | block_0 | digits | 0.01 | 2.5 | 0.0035 | 1.3e-06 | 0.98 / 0.92 / 0.72 | - |" in out
    assert "| lmm seed 0 | block_0 | constant | 0.01 | 3e-05 | 3e-08 | - (no gate) | - | 0.02 / 0.05 |" in out


def test_processes_merging_into_one_results_file_keep_every_entry(tmp_path):
    """Several measurements written into one --json at once (one process per run) all survive."""
    import subprocess
    import sys

    path = tmp_path / "results" / "interference.json"
    script = ("import pathlib, sys; from experiments.recall_interference import write_merged\n"
              "for i in range(20):\n"
              "    write_merged(pathlib.Path(sys.argv[1]), {f'run {sys.argv[2]}.{i}': {'params_digest': 'd'}})\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), str(k)]) for k in range(4)]
    assert [writer.wait(timeout=120) for writer in writers] == [0] * 4
    merged = recall_interference.json.loads(path.read_text())
    assert sorted(merged) == sorted(f"run {k}.{i}" for k in range(4) for i in range(20))
    assert [p.name for p in path.parent.iterdir()] == ["interference.json"]  # no temporary left


def test_seed_tables_average_the_seeds_of_a_setting_per_haystack():
    def cell(accuracy, low=0.1, high=0.9):
        return {"accuracy": accuracy, "ci95": [low, high]}

    results = {"lmm seed 0 [filler books:train]": {"recall": {"books": {"1024": cell(0.9), "16384": cell(0.5)}}},
               "lmm seed 1 [filler books:train]": {"recall": {"books": {"1024": cell(0.7)}}},
               "mag seed 0": {"recall": {"books": {"16384": cell(0.25, 0.15, 0.4)}, "noise": {"1024": cell(1.0)}}}}
    out = recall_interference.seed_tables(results)
    books, noise = out.split("filler noise:")
    assert "| lmm [filler books:train] | 0, 1 | 0.80 ± 0.14 (n=2) | 0.50 [0.10, 0.90] |" in books
    assert "| mag | 0 | - | 0.25 [0.15, 0.40] |" in books
    assert "| mag | 0 | 1.00 [0.10, 0.90] | - |" in noise and "lmm" not in noise
