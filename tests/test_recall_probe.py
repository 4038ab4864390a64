import json

import numpy as np
import pytest

from experiments import recall_probe
from experiments.recall_probe import PAIR, TextFiller, distance_bins, recall_batch, recall_row


def test_a_row_queries_every_pair_once_and_marks_only_the_values():
    for seed in range(20):
        ids, mask, distance = recall_row(np.random.default_rng(seed), 256, 8)
        assert ids.shape == (257,) and mask.shape == distance.shape == (256,)
        text = bytes(ids.tolist())
        pairs = {text[i:i + 2]: text[i + 3:i + 4] for i in range(0, 8 * PAIR, PAIR)}
        assert len(pairs) == 8 and all(text[i + 2:i + 3] == b":" for i in range(0, 8 * PAIR, PAIR))
        answered = {}
        for t in np.flatnonzero(mask):  # the target ids[t + 1] is the value after "key:"
            assert text[t:t + 1] == b":" and distance[t] >= PAIR
            key, value = text[t - 2:t], text[t + 1:t + 2]
            answered[key] = value
            first = text.index(key + b":")  # the pair itself, distance tokens before the query's value
            assert first + 3 + distance[t] == t + 1
        assert answered == pairs  # every pair queried once, with its own value
        assert not distance[~mask].any()
        covered = np.zeros(257, bool)
        covered[:8 * PAIR] = True
        for t in np.flatnonzero(mask):
            covered[t - 2:t + 2] = True
        assert set(ids[~covered].tolist()) <= set(b"0123456789")  # the rest is filler digits


def test_batches_are_a_pure_function_of_seed_and_step_and_distances_spread():
    a, b = recall_batch(3, 5, 16, 256, 8), recall_batch(3, 5, 16, 256, 8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], recall_batch(3, 6, 16, 256, 8)[0])
    distances = a[2][a[1]]
    assert distances.min() < 64 and distances.max() > 128  # inside and beyond a 128-token window
    with pytest.raises(ValueError, match="need 64 tokens"):  # 8 pairs + 8 queries do not fit
        recall_row(np.random.default_rng(0), 62, 8)


def test_a_gap_separates_each_key_from_its_value_in_pairs_and_queries():
    gap = 5
    for seed in range(10):
        ids, mask, distance = recall_row(np.random.default_rng(seed), 256, 4, gap)
        text = bytes(ids.tolist())
        span = PAIR + gap
        pairs = {text[i:i + 2]: text[i + span - 1:i + span] for i in range(0, 4 * span, span)}
        assert all(text[i + span - 2:i + span - 1] == b":" for i in range(0, 4 * span, span))
        assert all(set(text[i + 2:i + span - 2]) <= set(b"0123456789") for i in range(0, 4 * span, span))
        answered = {}
        for t in np.flatnonzero(mask):
            assert text[t:t + 1] == b":"
            key = text[t - gap - 2:t - gap]
            answered[key] = text[t + 1:t + 2]
            assert text.index(key) + span - 1 + distance[t] == t + 1
        assert answered == pairs
    with pytest.raises(ValueError, match="need 72 tokens"):
        recall_row(np.random.default_rng(0), 70, 4, gap)
    with pytest.raises(ValueError, match="gap >= 0"):
        recall_row(np.random.default_rng(0), 256, 4, -1)


def test_a_text_filler_fills_the_row_with_a_window_of_its_text_and_no_colon():
    text = "KING. Hear me: the crown is mine; ask of me what you will, lords. " * 30
    source = TextFiller.from_text("play", text)
    plain = bytes(source.data.tolist())
    assert plain == text.replace(":", ";").encode() and not source.data.flags.writeable
    for seed in range(5):
        ids, mask, distance = recall_row(np.random.default_rng(seed), 256, 6, filler=source)
        digits = recall_row(np.random.default_rng(seed), 256, 6)
        np.testing.assert_array_equal(ids[:6 * PAIR], digits[0][:6 * PAIR])  # the same pairs as the digit row
        row = bytes(ids.tolist())
        queries = np.flatnonzero(mask)
        assert len(queries) == 6 and all(row.index(row[t - 2:t + 1]) + 3 + distance[t] == t + 1 for t in queries)
        assert {row[t - 2:t + 2] for t in queries} == {row[i:i + PAIR] for i in range(0, 6 * PAIR, PAIR)}
        between = row[6 * PAIR:queries.min() - 2]  # the filler between the pairs and the first query
        assert between in plain and row.count(b":") == 12  # the 6 pairs' and 6 queries' colons only
    again = recall_batch(4, 2, 3, 256, 6, filler=source)
    np.testing.assert_array_equal(again[0], recall_batch(4, 2, 3, 256, 6, filler=source)[0])
    with pytest.raises(ValueError, match="fewer than the 4,097 a row needs"):
        recall_row(np.random.default_rng(0), 4096, 6, filler=source)
    noise = TextFiller.from_text("noise", "The grass is green. ", repeating=True)
    ids, mask, _ = recall_row(np.random.default_rng(0), 4096, 6, filler=noise)
    tiled = bytes(ids[6 * PAIR:np.flatnonzero(mask).min() - 2].tolist())
    assert len(tiled) > 1000 and tiled in b"The grass is green. " * 300  # a repeating text is tiled to any length
    with pytest.raises(ValueError, match="empty"):
        TextFiller.from_text("nothing", "")


def test_evaluating_on_the_text_a_run_trained_on_is_refused(tmp_path, capsys):
    from experiments.recall_probe import shared_text

    assert shared_text("books", "books") and shared_text("books:validation+test", "books")
    assert shared_text("essays", "essays") and shared_text("books:train", "books:train+validation")
    assert not shared_text("books:train", "books") and not shared_text("books:train", "essays")
    assert not shared_text("noise", "noise") and not shared_text("digits", "digits")
    for argv in (["--filler", "essays"], ["--filler", "books:train", "--eval-filler", "books:train"]):
        with pytest.raises(SystemExit):  # refused before any text is loaded or anything trained
            recall_probe.main(["--quick", *argv, "--out", str(tmp_path)])
        assert "draw from the same text" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_distance_bins_cover_the_row():
    assert distance_bins(256, 128) == [(0, 64), (64, 128), (128, 257)]
    assert distance_bins(1024, 128) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1025)]
    assert distance_bins(64, 128) == [(0, 65)] and distance_bins(40, 1) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16),
                                                                       (16, 32), (32, 41)]


@pytest.mark.slow  # trains two tiny models two steps (~1 min); the generator is tested above
def test_quick_probe_trains_evaluates_and_reuses_the_run(tmp_path):
    results = recall_probe.main(["--quick", "--variants", "lmm", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "lmm" / "seed0" / "recall.json").read_text())
    assert record == results[("lmm", 0)] and record["step"] == 2
    assert sum(cell["count"] for cell in record["accuracy_by_distance"].values()) == 8 * 16 * 8
    metrics = (tmp_path / "lmm" / "seed0" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics]
    assert record["loss_last_100_steps"] == pytest.approx(sum(losses[-2:]) / 2) and record["set"] == []
    again = recall_probe.main(["--quick", "--variants", "lmm", "--out", str(tmp_path)])  # finished: not retrained
    assert again[("lmm", 0)] == record
    # --eval-lengths: the finished run evaluated again on longer rows, every query counted once
    longer = recall_probe.main(["--quick", "--variants", "lmm", "--eval-lengths", "512", "--long-eval-batches", "2",
                                "--out", str(tmp_path)])[("lmm", 0)]
    assert longer["step"] == 2 and list(longer["accuracy_by_length"]) == ["512"]
    assert longer["accuracy_by_distance"] == record["accuracy_by_distance"]  # the training length: as before
    cells = longer["accuracy_by_length"]["512"]
    assert sum(cell["count"] for cell in cells.values()) == 2 * 16 * 8 and list(cells)[-1].endswith("-512")
    assert longer["params_digest"] == record["params_digest"]
    # evaluated again at another length: the file keeps the 512-token result beside the new one
    more = recall_probe.main(["--quick", "--variants", "lmm", "--eval-lengths", "384", "--long-eval-batches", "1",
                              "--long-batch", "3", "--stream-window", "128", "--out", str(tmp_path)])[("lmm", 0)]
    assert list(more["accuracy_by_length"]) == ["384", "512"] and more["accuracy_by_length"]["512"] == cells
    assert sum(cell["count"] for cell in more["accuracy_by_length"]["384"].values()) == 3 * 8  # streamed, 3 rows
    assert more["long_eval"]["384"]["stream_window"] == 128 and more["long_eval"]["384"]["rows"] == 3
    assert more["long_eval"]["512"]["stream_window"] is None and more["long_eval"]["384"]["peak_rss_bytes"] > 0
    assert json.loads((tmp_path / "lmm" / "seed0" / "recall.json").read_text()) == more
    # --loss-on all: every next token is a target (most are random digits), so the loss differs
    everything = recall_probe.main(["--quick", "--variants", "lmm", "--loss-on", "all", "--out", str(tmp_path / "all")])
    assert everything[("lmm", 0)]["loss_on"] == "all" and record["loss_on"] == "answers"
    assert everything[("lmm", 0)]["loss_last_100_steps"] != pytest.approx(record["loss_last_100_steps"], rel=1e-3)
    # --init-from: a curriculum, the finished run continued on longer rows from its final parameters
    parent = tmp_path / "lmm" / "seed0"
    continued = recall_probe.main(["--quick", "--variants", "lmm", "--seq-len", "320", "--init-from", str(tmp_path),
                                   "--out", str(tmp_path / "continued")])[("lmm", 0)]
    assert continued["init_from"] == {"run": str(parent), "step": 2, "params_digest": record["params_digest"],
                                      "seq_len": 256}
    assert continued["params_digest"] != record["params_digest"] and continued["seq_len"] == 320
    assert recall_probe.row_changes(continued) == ["320-token rows", "after 256-token rows (2 steps)"]
    with pytest.raises(SystemExit, match="differs from this run's in"):
        recall_probe.main(["--quick", "--variants", "lmm", "--set", "model.lmm.theta_max=0.01", "--init-from",
                           str(parent), "--out", str(tmp_path / "other")])


class _PlantedMemory:
    """A stand-in model whose one memory layer writes key e_p at pair p's value token and reads
    with e_p at pair p's query (2 persistent tokens first), or the same key everywhere."""

    def __init__(self, mask, distance, same_keys=False):
        batch, length = mask.shape
        dim = 16
        keys = np.zeros((batch, 1, 2 + length, dim))
        queries = np.zeros_like(keys)
        keys[..., 0] = queries[..., 0] = 1e-3  # nothing is exactly zero
        for row in range(batch):
            for p, at in enumerate(np.flatnonzero(mask[row])):
                keys[row, 0, 2 + at + 1 - distance[row, at], 0 if same_keys else p + 1] = 1.0
                queries[row, 0, 2 + at, 0 if same_keys else p + 1] = 1.0
        self.inputs = (keys, keys, queries, None, None, None)

    def apply(self, variables, ids, mutable):
        return None, {"diagnostics": {"block_0": {"memory": {"memory_inputs": (self.inputs,)}}}}


def test_address_match_finds_planted_keys_and_sees_identical_ones():
    ids, mask, distance = recall_batch(3, 0, 4, 128, 6, gap=2)
    found = recall_probe.address_match(_PlantedMemory(mask, distance), {}, ids, mask, distance)
    planted = {"top1": 1.0, "own": 1.0, "other": 0.0, "key_spread": 0.0}
    assert found["block_0/memory"] == pytest.approx(planted, abs=1e-5)
    same = recall_probe.address_match(_PlantedMemory(mask, distance, same_keys=True), {}, ids, mask, distance)
    cell = same["block_0/memory"]
    assert cell["key_spread"] == pytest.approx(1.0) and cell["own"] == pytest.approx(cell["other"])


def test_eval_lengths_must_hold_the_pairs_and_queries(tmp_path):
    with pytest.raises(SystemExit):  # 8 pairs of 4 tokens and their queries: 64 tokens a row
        recall_probe.main(["--quick", "--eval-lengths", "62", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        recall_probe.main(["--quick", "--eval-lengths", "1k", "--out", str(tmp_path)])
    for bad in (["--stream-window", "-1"], ["--long-batch", "0"]):
        with pytest.raises(SystemExit):
            recall_probe.main(["--quick", "--eval-lengths", "512", *bad, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before anything was trained


def test_address_needs_two_pairs_and_unscanned_layers(tmp_path):
    with pytest.raises(SystemExit):
        recall_probe.main(["--quick", "--address", "--pairs", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="scan_layers"):
        recall_probe.main(["--quick", "--variants", "lmm", "--address", "--set", "model.scan_layers=true",
                           "--out", str(tmp_path)])
    assert not (tmp_path / "lmm").exists()  # refused before any training


def _record(seed=0, digest="d0", lengths=None, **extra):
    return {"variant": "lmm", "seed": seed, "step": 600, "params_digest": digest, "gap": 0, "set": [],
            "loss_on": "answers", "seq_len": 256, "pairs": 8, "accuracy_by_distance": {"0-256": {
                "correct": 9, "count": 10, "accuracy": 0.9}}, **({"accuracy_by_length": lengths} if lengths else {}),
            **extra}


def test_a_new_evaluation_keeps_what_an_earlier_one_of_the_same_run_measured(tmp_path):
    path = tmp_path / "recall.json"
    assert recall_probe.carry_over(_record(lengths={"1024": {"x": 1}}), path) == _record(lengths={"1024": {"x": 1}})
    path.write_text(json.dumps(_record(lengths={"4096": {"y": 2}, "1024": {"old": 0}}, address={"a": 1})))
    merged = recall_probe.carry_over(_record(lengths={"1024": {"x": 1}}), path)
    assert merged["accuracy_by_length"] == {"1024": {"x": 1}, "4096": {"y": 2}}  # the new 1024 wins, sorted
    assert list(merged["accuracy_by_length"]) == ["1024", "4096"] and merged["address"] == {"a": 1}
    other = _record(digest="d1", lengths={"1024": {"x": 1}})  # retrained: nothing of the old file is kept
    assert recall_probe.carry_over(other, path) == other
    on_text = _record(lengths={"1024": {"x": 1}}, eval_filler="essays")  # evaluated on another filler: nothing kept
    assert recall_probe.carry_over(on_text, path) == on_text
    older = _record(lengths={"4096": {"y": 2}})
    del older["params_digest"]  # written before the digest: the same step and training-length result
    path.write_text(json.dumps(older))
    assert list(recall_probe.carry_over(_record(), path)["accuracy_by_length"]) == ["4096"]
    path.write_text(json.dumps({**older, "step": 500}))
    assert "accuracy_by_length" not in recall_probe.carry_over(_record(), path)


def test_runs_on_a_text_filler_are_their_own_setting_in_the_recall_table():
    from experiments import recall_table

    digits, text = _record(), _record(filler="books:train", eval_filler="books")
    assert recall_table.setting_of(digits) != recall_table.setting_of(text)
    assert recall_table.label_of(recall_table.setting_of(digits)) == "LMM"
    assert recall_table.label_of(recall_table.setting_of(text)) == (
        "LMM (filler books:train, eval books)")
    longer = {**text, "seq_len": 1024, "batch": 8}
    assert recall_table.setting_of(longer) != recall_table.setting_of(text)
    assert recall_table.label_of(recall_table.setting_of(longer)) == (
        "LMM (1024-token rows, batch 8, filler books:train, eval books)")
    continued = {**longer, "init_from": {"run": "r", "step": 600, "params_digest": "d", "seq_len": 256}}
    assert recall_table.setting_of(continued) != recall_table.setting_of(longer)
    assert recall_table.label_of(recall_table.setting_of(continued)) == (
        "LMM (1024-token rows, batch 8, after 256-token rows (600 steps), filler books:train, eval books)")
    again = {**continued, "seq_len": 4096, "init_from": {"run": "q", "step": 300, "params_digest": "e",
                                                         "seq_len": 1024, "init_from": continued["init_from"]}}
    assert recall_table.label_of(recall_table.setting_of(again)) == (
        "LMM (4096-token rows, batch 8, after 256-token rows (600 steps), then 1024-token rows (300 steps), "
        "filler books:train, eval books)")
    assert recall_probe.row_changes(again) == ["4096-token rows", "batch 8", "after 256-token rows (600 steps), "
                                               "then 1024-token rows (300 steps)"]


def _cells(*bins):
    return {f"{lo}-{hi}": {"correct": c, "count": n, "accuracy": c / n} for lo, hi, c, n in bins}


def test_recall_curves_plot_a_cell_where_every_query_is_right(tmp_path):
    """Wilson's upper bound of 6/6 is 1 - 1e-16 in floating point: the error bar must not go negative."""
    from experiments import recall_table

    (tmp_path / "a.json").write_text(json.dumps(_record(0, "s0", {"1024": _cells((256, 1024, 6, 6))})))
    recall_table.main([str(tmp_path), "--plot", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_recall_table_merges_runs_counts_beyond_the_training_rows_and_gives_spread(tmp_path, capsys):
    from experiments import recall_table

    files = {  # seed 0 evaluated at 1K, later again at 4K (two files); seed 1 at both; MAG one seed
        "a.json": _record(0, "s0", {"1024": _cells((0, 255, 0, 50), (256, 1024, 30, 40))}),
        "b.json": _record(0, "s0", {"4096": _cells((256, 4096, 20, 40))}),
        "c.json": _record(1, "s1", {"1024": _cells((256, 1024, 10, 40)), "4096": _cells((512, 4096, 10, 20))}),
        "d.json": {**_record(0, "m0", {"1024": _cells((256, 1024, 45, 50))}), "variant": "mag"},
        "e.json": _record(2, "s2"),  # no long evaluation: left out
        "notes.json": {"something": "else"},
    }
    for name, record in files.items():
        (tmp_path / name).write_text(json.dumps(record))
    text = recall_table.main([str(tmp_path), "--plot", str(tmp_path / "curves.png")])
    assert capsys.readouterr().out.startswith(text) and (tmp_path / "curves.png").stat().st_size > 0
    by_length, by_distance = text.split("\n\n")[0], text.split("\n\n")[-1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in by_length.splitlines()[2:]]
    rows = {row[0]: row for row in rows}
    assert set(rows) == {"LMM", "MAG"}
    lmm = rows["LMM"]
    assert lmm[1] == "0, 1" and lmm[3] == "0.90 ± 0.00 (0.90, 0.90)"  # the training length: every query
    assert lmm[4] == "0.50 ± 0.35 (0.75, 0.25)"  # 1K: only the bins >= 256 back (30/40 and 10/40)
    assert lmm[5] == "0.50 ± 0.00 (0.50, 0.50)"
    assert rows["MAG"][4].startswith("0.90 [0.79, 0.96] (n=50)") and rows["MAG"][5] == "-"
    # by distance, per run, pooled over its lengths (seed 0: 30/40 at 1K and 20/40 at 4K start at 256), >= 256
    assert by_distance.splitlines()[0] == "| model | seed | 256-512 | 512-1K |"
    expected = ["| LMM | 0 | 50/80 (0.62) | - |", "| LMM | 1 | 10/40 (0.25) | 10/20 (0.50) |",
                "| MAG | 0 | 45/50 (0.90) | - |"]
    assert by_distance.splitlines()[2:] == expected
    assert lmm[5] == "0.50 ± 0.00 (0.50, 0.50)"  # seed 0's 4K: 256-4096 back (20/40); seed 1's: 512-4096 back
    one = recall_table.format_cell({0: (45, 50), 1: (0, 0)})
    assert one.startswith("0.90 [") and one.endswith("(n=50, seed 0 only)")
    undigested = {key: value for key, value in files["b.json"].items() if key != "params_digest"}
    assert recall_table.same_run(files["a.json"], undigested)  # an older file: the same training-length result
    (tmp_path / "f.json").write_text(json.dumps(_record(1, "other", {"1024": _cells((256, 1024, 1, 40))})))
    with pytest.raises(ValueError, match="two different trained runs of LMM seed 1"):
        recall_table.main([str(tmp_path)])
    (tmp_path / "f.json").write_text(json.dumps(_record(1, "s1", {"1024": _cells((256, 1024, 11, 40))})))
    with pytest.raises(ValueError, match="evaluated twice at 1024 tokens"):
        recall_table.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no recall_probe results"):
        recall_table.main([str(tmp_path / "e.json")])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        recall_table.main([str(tmp_path / "missing.json")])


# the plumbing (cache, pieces, where each prediction lands) with a windowed and a growing full attention
# cache; a memory model's streaming itself is tested in test_streaming (its compile here costs ~30 s: slow)
@pytest.mark.parametrize("variant", ["swa", "transformer", pytest.param("lmm", marks=pytest.mark.slow)])
def test_streamed_evaluation_equals_the_parallel_pass(variant):
    import jax

    from experiments.configs import apply_overrides, get_config
    from titans_jax.models import TitansLM

    config = apply_overrides(get_config(f"lc_{variant}"), ["preset=tiny"]).model_config(vocab_size=256)
    model = TitansLM(config)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    ids, mask, distance = recall_batch(recall_probe.EVAL_SEED_OFFSET + 5, 0, 2, 200, 4)
    streamed = recall_probe.streamed_predictions(model, params, ids[:, :-1], 50)  # four pieces of 50
    parallel = np.asarray(jax.jit(lambda x: model.apply({"params": params}, x))(ids[:, :-1]).argmax(-1))
    assert streamed.shape == (2, 200) and np.mean(streamed == parallel) == 1.0
    bins = distance_bins(200, config.window)
    cells = recall_probe.evaluate(model, params, 5, 1, 2, 200, 4, bins, stream_window=50)
    right = parallel == ids[:, 1:]
    for (lo, hi), cell in zip(bins, cells.values(), strict=True):
        where = mask & (distance >= lo) & (distance < hi)
        assert (cell["correct"], cell["count"]) == (right[where].sum(), where.sum())
