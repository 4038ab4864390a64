"""The small-scale Table 2 driver (experiments.long_context_table): its --quick variant runs every
phase (train on the task mixture, evaluate, long phase, report) on books written by the test,
then a rerun does no work and reads what is there; the table's statistics."""

import json
import random

import pytest

from experiments import long_context_table as lc
from titans_jax.data import corpora
from titans_jax.data.testing import BOOK_FIXTURES


def write_long_books(root):
    """The fixture books' names (and so their splits), each ~25 KB of distinct sentences."""
    rng = random.Random(0)
    places = ["harbour", "meadow", "chapel", "orchard", "mill", "bridge", "garden", "cellar"]
    for name in BOOK_FIXTURES:
        source, stem = name.split("/")
        text = " ".join(f"In part {i} of {stem} the {rng.choice(['old', 'young', 'tall'])} traveller reached the "
                        f"{rng.choice(places)} at dusk." for i in range(400))
        path = root / "texts" / source / f"{stem}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for source in corpora.BOOK_SOURCES:
        corpora.write_manifest(root / "texts" / source, source)


def test_quick_grid_runs_every_phase_and_a_rerun_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path / "cache"))
    write_long_books(tmp_path / "cache")
    out = tmp_path / "grid"
    first = lc.main(["--quick", "--out", str(out)])
    assert set(first["rows"]) == {("mac", 0), ("swa", 0)}
    for rows in first["rows"].values():
        assert {(r["task"], r["length"]) for r in rows} == {("niah_single_1", 1024), ("qa1", 1024)}
        assert all(r["score"] in (0.0, 1.0) and r["seed"] < 10 for r in rows)
    assert {variant for variant, _ in first["long_rows"]} == {"mac", "swa"}
    assert [r["length"] for r in first["long_rows"][("swa", 0)]] == [2048]
    table = (out / "table.md").read_text()
    assert "**niah_single_1**" in table and "| mac |" in table and "Long contexts" in table
    assert "its characters in place" in table and "- mac niah_single_1 (n=1): " in table
    assert f"`python -m experiments.long_context_table --quick --out {out}`" in table  # the command that made it
    assert (out / "accuracy_vs_length.png").exists() and (out / "heatmap_mac_niah_single_1.png").exists()
    assert len(json.loads((out / "results.json").read_text())) == 2 * 2 + 2 * 1
    assert first["files"] == {"table.md": table, "results.json": (out / "results.json").read_text()}  # what it wrote
    config = json.loads((out / "mac" / "seed0" / "config.json").read_text())
    assert config["config"]["data"]["task_fraction"] == 0.5 and config["config"]["preset"] == "tiny"
    evaluated = sorted((out / "mac" / "seed0" / "long_context").iterdir())
    stamps = [path.stat().st_mtime_ns for path in evaluated]
    again = lc.main(["--quick", "--out", str(out)])  # finished runs and evaluations are reused, not redone
    assert [path.stat().st_mtime_ns for path in sorted((out / "mac" / "seed0" / "long_context").iterdir())] == stamps
    assert again["rows"] == first["rows"]
    report = lc.main(["--quick", "--report-only", "--ablations", "", "--out", str(out)])
    assert report["rows"] == first["rows"]
    assert f"`python -m experiments.long_context_table --quick --report-only --ablations '' --out {out}`" in (
        out / "table.md").read_text()  # the command as it can be pasted back, empty arguments included
    check_init_from(out / "mac" / "seed0", tmp_path / "continued")
    check_evaluation_changes(out / "mac" / "seed0")


def check_evaluation_changes(run):
    """load_trained(run, changes): the trained parameters under a changed model config where the
    change keeps them; a change of their shapes is refused, naming a leaf."""
    import jax
    import numpy as np

    from titans_jax.training import load_trained

    config, params, _ = load_trained(run)
    changed, same_params, _ = load_trained(run, {"lmm.theta_max": 0.123})
    assert changed == config.replace({"lmm.theta_max": 0.123}) != config
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, same_params))
    with pytest.raises(ValueError, match=r"changes the model's parameters at \['block_.*only changes that keep"):
        load_trained(run, {"lmm.memory.expansion": 2})
    with pytest.raises(ValueError, match=r"\(trained float32\[.*\], changed bfloat16\["):
        load_trained(run, {"param_dtype": "bfloat16", "dtype": "bfloat16"})


def check_init_from(parent, out):
    """experiments.train --init-from (what the table's --init-from passes on): the run starts from
    the parent's final parameters (its first loss is not a fresh model's), records where it started,
    and a model that differs from the parent's is refused with the fields that differ."""
    from experiments import train as train_cli
    from titans_jax.training import load_trained, params_digest

    overrides = sum((["--set", item] for item in lc.QUICK["train_overrides"]), [])  # the grid's compiled step
    with pytest.raises(SystemExit, match=r"its model differs from this run's in \['num_layers'\]"):
        train_cli.main(["--config", "lc_mac", "--out", str(out), "--no-progress", "--init-from", str(parent),
                        *overrides, "--set", "model.num_layers=1"])
    assert not out.exists()  # refused before anything was written
    train_cli.main(["--config", "lc_mac", "--out", str(out), "--no-progress", "--init-from", str(parent), *overrides])
    _, params, _ = load_trained(parent)
    record = json.loads((out / "config.json").read_text())
    assert record["init_from"] == {"run": str(parent), "step": 2, "params_digest": params_digest(params)}

    def first_loss(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(row["loss"] for row in rows if row.get("step") == 1 and "loss" in row)

    assert first_loss(out) != first_loss(parent)  # the same first batch (same data seed), other parameters


def check_prompt_length_probe(run):
    """prompt_length_probe on the quick grid's MAC run: one training-distribution example per
    prompt length, greedy answer counted."""
    from experiments import prompt_length_probe

    probe = prompt_length_probe.main(["--run", str(run), "--lengths", "400,420", "--depths", "0,1", "--count", "1",
                                      "--new-tokens", "2"])
    assert probe.keys() == {(400, 0.0), (400, 1.0), (420, 0.0), (420, 1.0)}
    # the needle at depth 0 is further from the question than at depth 1, by about the haystack
    assert probe[(420, 0.0)][2] > probe[(420, 1.0)][2] > 0 and all(count == 1 for _, count, _ in probe.values())


@pytest.mark.slow  # ~2 min: its own quick grid, then three tools that each compile the model anew
def test_probe_tools_on_a_quick_grid_run(tmp_path, monkeypatch):
    """The probe tools on the quick grid's MAC run (here, not in the default grid test: ~20 s of
    compilation each). gate_trace: one row per window for every memory layer, the gates in their
    ranges, the gradient reach normalised to the last window; prompt_length_probe."""
    from experiments import gate_trace, grad_spikes

    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path / "cache"))
    write_long_books(tmp_path / "cache")
    lc.main(["--quick", "--out", str(tmp_path / "grid")])
    run = tmp_path / "grid" / "mac" / "seed0"
    sets = sum((["--set", item] for item in lc.QUICK["train_overrides"]), [])
    report = gate_trace.main(["--run", str(run), "--config", "lc_mac", *sets, "--step", "2", "--window", "256"])
    layers = report[2]
    assert sorted(layers) == ["block_0/mac/memory", "block_1/mac/memory"]
    for rows in layers.values():
        assert [(r["start"], r["end"]) for r in rows] == [(0, 256), (256, 512), (512, 768), (768, 1024)]
        assert all(0 < r["theta"] <= r["theta_max"] <= 0.1 and 0 < r["eta"] < 1 and 0 < r["alpha"] < 1
                   and r["chunk_step"] > 0 and r["weight_norm"] > 0
                   and 0 < r["surprise_median"] <= r["surprise_max"] < float("inf") for r in rows)
        assert rows[-1]["reach"] == pytest.approx(1.0)
    # grad_spikes --by-position from the initial state: one norm per doubling range of targets
    rows = grad_spikes.main(["--run", str(run), "--config", "lc_mac", *sets, "--from-step", "0", "--to-step", "0",
                             "--by-position"])
    assert [(lo, hi) for lo, hi, _ in rows] == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1024)]
    assert all(0 < norm < float("inf") for _, _, norm in rows)
    check_prompt_length_probe(run)


def test_cells_give_spread_over_seeds_or_a_binomial_interval():
    assert lc.cell({0: [1.0, 0.0], 1: [1.0, 1.0], 2: [0.0, 0.0]}) == "50 ± 50"
    lo, hi = lc.binomial_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35  # Wilson: [0, 27.8%]
    assert lc.cell({0: [1.0] * 10}).startswith("100 [72, 100]")
    assert lc.cell({}) == ""


def test_unknown_variants_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        lc.main(["--variants", "mac,nonsense", "--out", str(tmp_path)])


def test_characters_in_place_count_a_partly_recalled_needle():
    # the answer's first word, its full stop dropped, character by character against the needle
    assert lc.answer_in_place("6976681", " 4976221.\n") == [False, True, True, True, False, False, True]
    assert lc.answer_in_place("6976681", " 6976681.\n") == [True] * 7
    assert lc.answer_in_place("6976681", " 697") == [True, True, True] + [False] * 4  # a short answer misses the rest
    assert lc.answer_in_place("6976681", "") == [False] * 7
    assert lc.characters_in_place({"answer": "1234", "output": " 1200 and more"}) == 0.5
    # a fraction per example has no binomial interval: one seed shows the mean and the count
    assert lc.cell({0: [0.5, 0.25]}, binary=False) == "38 (n=2)"
    assert lc.cell({0: [1.0, 1.0]}, binary=False) == "100 (n=2)"
    rows = {("lmm", 0): [{"task": "niah_single_1", "length": 1024, "answer": "1234", "output": " 1299.", "score": 0.0},
                         {"task": "niah_single_1", "length": 1024, "answer": "5678", "output": " 5678.", "score": 1.0}]}
    assert lc.collect(rows, lc.characters_in_place) == {"lmm": {"niah_single_1": {1024: {0: [0.5, 1.0]}}}}
    assert lc.collect(rows) == {"lmm": {"niah_single_1": {1024: {0: [0.0, 1.0]}}}}
