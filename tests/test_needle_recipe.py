"""experiments.needle_recipe: the S-NIAH recipe of the committed results as one command."""

import json
import pathlib

import pytest

from experiments import needle_recipe as nr

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results" / "long_context_niah"


def committed_command(name: str) -> str:
    """The driver command a committed stage table records (its third line, in backticks)."""
    return (RESULTS / name).read_text().splitlines()[2].strip("`")


@pytest.mark.parametrize("variant,seed,tag,sets,stage,table", [
    ("lmm", 1, "lmm_noln", ["model.lmm.memory.residual_norm=false"], "stage1",
     "lc_niah_lmm_noln_scratch_seed1_table.md"),
    ("lmm", 1, "lmm_noln", ["model.lmm.memory.residual_norm=false"], "stage2",
     "lc_niah_lmm_noln_scratch_stage2_seed1_table.md"),
    ("mal", 1, "mal", [], "stage2", "lc_niah_mal_scratch_stage2_seed1_table.md"),
    ("ttt", 0, "ttt", [], "stage2", "lc_niah_ttt_scratch_stage2_seed0_table.md"),
    ("mag", 1, "mag", [], "long16k", "lc_niah_mag_scratch_long16k_seed1_table.md"),
])
def test_the_stages_are_the_commands_of_the_committed_results(variant, seed, tag, sets, stage, table):
    phases = {p["name"]: p for p in nr.plan(variant, seed, tag, sets, pathlib.Path("runs"), stage16k=True)}
    assert nr.command(phases[stage]) == committed_command(table)
    assert phases[stage]["results"][phases[stage]["out"] / "table.md"] == table


@pytest.mark.parametrize("phase,file", [
    ("passkeys", "needle_cue_lmm_noln_scratch_seed1.json"),
    ("numbers", "needle_cue_lmm_clip_scratch_seed1_number.json"),
    ("long16k passkeys", "needle_cue_lmm_linear_scratch_long16k_seed0.json"),
    ("uuids", "needle_cue_mag_no_persistent_scratch_seed1_uuid.json"),
    ("passkeys every_eval", "needle_cue_lmm_floor_scratch_seed1_every_eval.json"),
    ("numbers every_eval", "needle_cue_lmm_floor_scratch_seed1_every_eval_number.json"),
])
def test_the_needles_are_those_of_the_committed_files(phase, file):
    saved = json.loads((RESULTS / file).read_text())["args"]
    variant, tag = saved["run"].split("/")[-2], file.split("needle_cue_")[1].split("_scratch")[0]
    seed = int(saved["run"].rsplit("seed", 1)[1])
    phases = {p["name"]: p for p in nr.plan(variant, seed, tag, [], pathlib.Path("runs"), numbers=48, stage16k=True,
                                            uuids=48, every_eval=True)}
    assert {key: saved[key] for key in phases[phase]["options"]} == phases[phase]["options"]
    assert (saved.get("set") or []) == phases[phase]["options"].get("set", [])  # the evaluation's overrides
    assert phases[phase]["out"] == pathlib.Path(saved["out"]) and phases[phase]["results"] == {
        phases[phase]["out"]: file}


def test_stage2_data_seed():
    assert [nr.stage2_data_seed(s) for s in (0, 1, 2)] == [1, 1001, 1002]


def test_a_needle_file_is_reused_only_when_made_with_the_same_options(tmp_path):
    phase = nr.plan("lmm", 2, "lmm", [], tmp_path)[2]
    assert phase["name"] == "passkeys" and not nr.finished(phase)
    phase["out"].write_text(json.dumps({"args": dict(phase["options"], out=str(phase["out"]), window=4096)}))
    assert nr.finished(phase)
    phase["out"].write_text(json.dumps({"args": dict(phase["options"], per_cell=32)}))
    with pytest.raises(SystemExit, match=r"other options \{'per_cell': \(32, 96\)\}"):
        nr.finished(phase)
    phase["out"].write_text("{")
    with pytest.raises(SystemExit, match="not a needle_cue --out file"):
        nr.finished(phase)
    assert not nr.finished(nr.plan("lmm", 2, "lmm", [], tmp_path)[0])  # a training stage: the driver decides


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        nr.main(["--variant", "lmm", "--seed", "0", "--set", "model.lmm.memory.residual_norm=false", "--dry-run"])
    assert "give it a --tag of its own" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nr.main(["--variant", "nope", "--seed", "0", "--dry-run"])
    assert "unknown variant 'nope'" in capsys.readouterr().err
    phases = nr.main(["--variant", "lmm", "--seed", "0", "--dry-run"])
    assert [p["name"] for p in phases] == ["stage1", "stage2", "passkeys"]
    assert "[recipe] passkeys: python -m experiments.needle_cue --run runs/lc_niah_lmm_scratch_stage2/lmm/seed0" in (
        capsys.readouterr().out)
    phases = nr.main(["--variant", "lmm", "--seed", "0", "--uuids", "48", "--dry-run"])   # not trained on: allowed
    assert [p["name"] for p in phases] == ["stage1", "stage2", "passkeys", "uuids"]
    assert "--task niah_single_3 --lengths 1024,4096,16384 --per-cell 48 --cues 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        nr.main(["--variant", "lmm", "--seed", "0", "--uuids", "-1", "--dry-run"])
    assert "--uuids must be >= 0, got -1" in capsys.readouterr().err
    phases = nr.main(["--variant", "mag", "--seed", "0", "--numbers", "48", "--every-eval", "--dry-run"])
    assert [p["name"] for p in phases] == ["stage1", "stage2", "passkeys", "numbers", "passkeys every_eval",
                                           "numbers every_eval"]
    assert ("--cues 0,1 --set model.lmm.memory.every_layer_floor=true --out "
            "runs/needle_cue_mag_scratch_seed0_every_eval.json") in capsys.readouterr().out
    for argv, message in [
            (["--variant", "swa", "--every-eval"], "--every-eval floors the memory's layers; 'swa' has no neural memory"),
            (["--variant", "lmm", "--tag", "q", "--tasks", "qa1", "--every-eval"], "which --tasks 'qa1' does not"),
            (["--variant", "lmm", "--tag", "f", "--set", nr.EVERY_LAYER_FLOOR, "--every-eval"], "trained floored"),
            (["--variant", "lmm", "--tag", "f", "--set", "model.lmm.memory.every_layer_floor=True", "--every-eval"],
             "trained floored")]:
        with pytest.raises(SystemExit):
            nr.main([*argv, "--seed", "0", "--dry-run"])
        assert message in capsys.readouterr().err


def test_other_tasks_train_and_fill_the_cells_and_need_a_tag(capsys):
    phases = nr.main(["--variant", "swa", "--seed", "1", "--tag", "swa_qa", "--tasks", "qa1,qa3", "--dry-run"])
    assert [p["name"] for p in phases] == ["stage1", "stage2"]  # no passkeys: not trained on
    argv = " ".join(phases[1]["argv"])
    assert "--tasks qa1,qa3 " in argv and "--set data.tasks=qa1,qa3 " in argv
    assert "--out runs/lc_niah_swa_qa_scratch_stage2" in argv
    quick = nr.plan("lmm", 0, "lmm_qa", [], pathlib.Path("runs"), quick=True, tasks="qa2,niah_single_1")
    argv = quick[0]["argv"]
    assert argv[len(argv) - 1 - argv[::-1].index("--tasks") + 1] == "qa2"  # the quick cell: the last --tasks wins
    assert [p["name"] for p in quick] == ["stage1", "stage2", "passkeys"]
    long = nr.main(["--variant", "mag", "--seed", "1", "--tag", "mag_qa1", "--tasks", "qa1", "--stage16k", "--dry-run"])
    assert [p["name"] for p in long] == ["stage1", "stage2", "long16k"]  # the 16K rows of qa1, no passkeys
    argv = " ".join(long[2]["argv"])
    assert "--set data.tasks=qa1 " in argv
    assert "--set run.seq_len=16384 --set run.batch_size=1 --set data.seed=2001" in argv
    assert "--init-from runs/lc_niah_mag_qa1_scratch_stage2 --out runs/lc_niah_mag_qa1_scratch_long16k" in argv
    long = nr.main(["--variant", "mag", "--seed", "0", "--tag", "mag_qa1", "--tasks", "qa1", "--stage4k", "--dry-run"])
    assert [p["name"] for p in long] == ["stage1", "stage2", "long4k"]
    argv = " ".join(long[2]["argv"])
    assert "--set run.steps=300 --set run.seq_len=4096 --set run.batch_size=2 --set data.seed=3000" in argv
    assert "--init-from runs/lc_niah_mag_qa1_scratch_stage2 --out runs/lc_niah_mag_qa1_scratch_long4k" in argv
    assert long[2]["results"][long[2]["out"] / "table.md"] == "lc_niah_mag_qa1_scratch_long4k_seed0_table.md"
    capsys.readouterr()
    for argv, message in [
            (["--tasks", "qa1", "--dry-run"], "--tasks changes the training: give it a --tag"),
            (["--tasks", "qa1,qa9", "--tag", "x", "--dry-run"], "--tasks 'qa1,qa9': give distinct tasks from"),
            (["--tasks", "qa1,qa1", "--tag", "x", "--dry-run"], "give distinct tasks"),
            (["--tasks", "niah_single_1,qa1", "--tag", "x", "--numbers", "4", "--dry-run"],
             "--numbers evaluates niah_single_2, which --tasks 'niah_single_1,qa1' does not train on")]:
        with pytest.raises(SystemExit):
            nr.main(["--variant", "lmm", "--seed", "0", *argv])
        assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_recipe_runs_every_phase_and_a_rerun_skips_them(tmp_path, capsys):
    """Every phase on the tiny preset, the outputs copied under their committed names; run again,
    nothing is trained or evaluated anew (~1.5 minutes on 2 cores). It trains on the books and
    evaluates numbers in the essays: skipped where they are not fetched."""
    from titans_jax.data import corpora
    from titans_jax.long_context import haystacks

    try:
        corpora.corpus_fingerprint("books")
        haystacks.essays_haystack()
    except FileNotFoundError as exc:
        pytest.skip(f"books or essays not fetched ({exc}); run `python -m titans_jax.data.fetch all`")
    argv = ["--variant", "lmm", "--seed", "0", "--quick", "--numbers", "1", "--stage16k", "--every-eval",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    phases = nr.main(argv)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(
        name for phase in phases for name in phase["results"].values())
    assert json.loads((tmp_path / "results" / "needle_cue_lmm_scratch_seed0_number.json").read_text())["args"][
        "task"] == "niah_single_2"
    assert json.loads((tmp_path / "results" / "needle_cue_lmm_scratch_seed0_every_eval_number.json").read_text())[
        "args"]["set"] == [nr.EVERY_LAYER_FLOOR]
    capsys.readouterr()
    nr.main(argv)
    out = capsys.readouterr().out
    assert out.count("done, skipping") == 3 and out.count("exists with these options, skipping") == 5


def test_a_stage_keeps_its_own_report_when_another_seed_rewrites_the_shared_folder(tmp_path, monkeypatch):
    """Seeds of one tag share a stage's folder: the files kept under --results are the ones this
    run wrote, even when a parallel seed's run replaced the folder's results.json before the copy."""
    from experiments import long_context_table, needle_cue, run_losses

    def stage(argv):
        out = pathlib.Path(argv[argv.index("--out") + 1])
        files = {"results.json": json.dumps([{"run_seed": 2}]), "table.md": "seed 2\n"}
        out.mkdir(parents=True, exist_ok=True)
        for name in files:  # what the other seed's run left there after this one wrote its report
            (out / name).write_text("seed 0\n")
        return {"files": files}

    def cue(argv):
        out = pathlib.Path(argv[argv.index("--out") + 1])
        out.write_text(json.dumps({"args": {"out": str(out)}}))

    monkeypatch.setattr(long_context_table, "main", stage)
    monkeypatch.setattr(needle_cue, "main", cue)
    monkeypatch.setattr(run_losses, "run_losses", lambda run: {"loss": 1.0, "books_bits_per_byte": None})
    nr.main(["--variant", "lmm", "--seed", "2", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")])
    for stem in ("lc_niah_lmm_scratch_seed2", "lc_niah_lmm_scratch_stage2_seed2"):
        assert json.loads((tmp_path / "res" / f"{stem}.json").read_text()) == [{"run_seed": 2}]
        assert (tmp_path / "res" / f"{stem}_table.md").read_text() == "seed 2\n"
    assert (tmp_path / "res" / "needle_cue_lmm_scratch_seed2.json").exists()
