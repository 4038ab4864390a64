"""The S-NIAH recipe of long_context_niah_cpu.md for one model and seed, from one command ([C2]).

    taskset -c 0 python -m experiments.needle_recipe --variant lmm --seed 2 --tag lmm_noln \\
        --set model.lmm.memory.residual_norm=false --numbers 48 --results experiments/results/long_context_niah

Runs, in order, each phase skipped when its output exists (an interrupted training resumes from
its last checkpoint, experiments.train):
1. stage 1: `experiments.long_context_table` on the `lc_<variant>` config, 600 steps of 8 rows of
   1,024 bytes, three quarters of them passkey / number task rows (RULER's niah_single_1/2; other
   tasks with --tasks, e.g. the BABILong-style qa1,qa2,qa3,qa4,qa5, evaluated in the same cells),
   the inner step capped (`model.lmm.theta_max=0.003`), data seed = run seed, from
   initialisation -> <runs>/lc_niah_<tag>_scratch/<variant>/seed<k>; the driver's 2-needle cells
   (1K / 4K / 16K, depths 0.1 / 0.5 / 0.9, two examples a cell).
2. stage 2: 900 more steps on fresh examples (data seed 1 for run seed 0, else 1000 + seed),
   warm-up and cosine restarted -> <runs>/lc_niah_<tag>_scratch_stage2; the same cells.
3. passkeys (when niah_single_1 is trained on): `experiments.needle_cue`, 96 passkeys at depth 0.5
   (evaluation seeds 0-95) at 1K / 4K / 16K with cues of 0 and 1 digits ->
   <runs>/needle_cue_<tag>_scratch_seed<k>.json.
4. with --numbers N: N numbers in the essays (niah_single_2, cue 0) -> ..._seed<k>_number.json;
   with --uuids N: N UUIDs in the essays (niah_single_3, cue 0; trained on or not: a model of
   7-digit needles answers them with digits, `needle_cue --uuid-digits`) -> ..._seed<k>_uuid.json.
5. with --stage16k: 300 steps of one 16,384-token row of the same tasks (data seed 2000 + seed) from
   stage 2 -> <runs>/lc_niah_<tag>_scratch_long16k (its cells as the other stages'), then, when the
   passkeys are trained on, its 96 passkeys at 1K / 4K / 16K (cue 0) ->
   needle_cue_<tag>_scratch_long16k_seed<k>.json.
6. with --stage4k: 300 steps of two 4,096-token rows of the same tasks (data seed 3000 + seed; the
   tokens of a stage-2 step) from stage 2 -> <runs>/lc_niah_<tag>_scratch_long4k, its cells.
7. with --every-eval: the passkeys of 3 (and the numbers of 4) again, the same parameters streamed
   with every memory layer floored at evaluation (`MemoryConfig.every_layer_floor`, an intervention
   the model was not trained with: does the gate's shrinking of the memory, or its drift, cost the
   needle?) ->
   ..._seed<k>_every_eval{,_number}.json.
Then it prints each run's loss over its last 100 steps and its books bits per byte
(experiments.run_losses). With --results DIR every output is copied there under the names the
committed results use: lc_niah_<tag>_scratch{,_stage2}_seed<k>{.json,_table.md} (the driver's
results.json and table.md of that stage as this seed's run wrote them: seeds of one tag share the
stage's folder, so they may run in parallel) and the needle_cue files. --tag names the runs
(default: the variant); give a new tag to every change made with --set, so runs of different
models never share a folder.

`--dry-run` prints the commands without running them; `--quick` runs every phase on the tiny
preset for two steps and one needle at 1K (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import shutil

from experiments.configs import CONFIGS, LONG_CONTEXT_TASKS

TASKS = "niah_single_1,niah_single_2"  # the task rows every model of long_context_niah_cpu.md trained on


def recipe(tasks: str = TASKS) -> tuple[str, ...]:
    """The driver's training options and cells: the same for every model but for its task rows."""
    return ("--ablations", "", "--long-lengths", "", "--tasks", tasks, "--lengths", "1024,4096,16384",
            "--depths", "0.1,0.5,0.9", "--per-cell", "2", "--set", f"data.tasks={tasks}",
            "--set", "data.task_fraction=0.75", "--set", "model.lmm.theta_max=0.003", "--set", "run.save_every=100")

STEPS = {"stage1": 600, "stage2": 900, "long16k": 300, "long4k": 300}
QUICK_TRAIN = ("preset=tiny", "run.seq_len=1024", "run.batch_size=2", "run.save_every=2", "run.log_every=1",
               "run.eval_batches=1", "run.sample_tokens=4", "optim.warmup_steps=1")
QUICK_CELLS = ("--lengths", "1024", "--depths", "0.5", "--per-cell", "1")  # and the first task


EVERY_LAYER_FLOOR = "model.lmm.memory.every_layer_floor=true"
NO_MEMORY = ("swa", "transformer")  # the architectures without a neural memory to floor


def stage2_data_seed(seed: int) -> int:
    """Stage 2's data seed: 1 for run seed 0 (the first runs), 1000 + seed otherwise."""
    return 1 if seed == 0 else 1000 + seed


def plan(variant: str, seed: int, tag: str, sets: list[str], runs: pathlib.Path, numbers: int = 0,
         stage16k: bool = False, quick: bool = False, tasks: str = TASKS, uuids: int = 0,
         stage4k: bool = False, every_eval: bool = False) -> list[dict]:
    """The phases in order: {"name", "module" (long_context_table / needle_cue), "argv", "out" (the
    stage's --out folder or the needle_cue file), "results" ({source: committed name}), and for
    needle_cue the "options" its file must have been made with}. The passkeys are evaluated when
    `tasks` trains on them (niah_single_1)."""
    stem = f"lc_niah_{tag}_scratch"
    common = ["--variants", variant, "--seeds", str(seed), *recipe(tasks)]
    extra = [item for s in (QUICK_TRAIN if quick else ()) + tuple(sets) for item in ("--set", s)]
    if quick:
        common += ["--tasks", tasks.split(",")[0], *QUICK_CELLS]
    steps = {name: 2 if quick else n for name, n in STEPS.items()}
    lengths, passkeys = ("1024", 1) if quick else ("1024,4096,16384", 96)

    def stage(name, folder, run_sets, init_from=None, suffix=""):
        out = runs / folder
        argv = common + extra + [item for s in run_sets for item in ("--set", s)]
        argv += (["--init-from", str(init_from)] if init_from else []) + ["--out", str(out)]
        return {"name": name, "module": "long_context_table", "argv": argv, "out": out,
                "results": {out / "results.json": f"{stem}{suffix}_seed{seed}.json",
                            out / "table.md": f"{stem}{suffix}_seed{seed}_table.md"}}

    def cue(name, run, file, task, per_cell, cues, sets=()):
        out = runs / file
        options = {"run": str(run / variant / f"seed{seed}"), "task": task, "lengths": lengths, "per_cell": per_cell,
                   "cues": cues}
        if sets:
            options["set"] = list(sets)  # needle_cue keeps its --set overrides as a list
        argv = [item for key, value in options.items()
                for one in (value if isinstance(value, list) else [value])
                for item in (f"--{key.replace('_', '-')}", str(one))]
        return {"name": name, "module": "needle_cue", "out": out, "results": {out: file}, "options": options,
                "argv": argv + ["--out", str(out), "--no-progress"]}

    phases = [stage("stage1", stem, [f"run.steps={steps['stage1']}"]),
              stage("stage2", f"{stem}_stage2", [f"run.steps={steps['stage2']}", f"data.seed={stage2_data_seed(seed)}"],
                    runs / stem, "_stage2")]
    if "niah_single_1" in tasks.split(","):
        phases.append(cue("passkeys", runs / f"{stem}_stage2", f"needle_cue_{tag}_scratch_seed{seed}.json",
                          "niah_single_1", passkeys, "0,1"))
    if numbers:
        phases.append(cue("numbers", runs / f"{stem}_stage2", f"needle_cue_{tag}_scratch_seed{seed}_number.json",
                          "niah_single_2", numbers, "0"))
    if uuids:
        phases.append(cue("uuids", runs / f"{stem}_stage2", f"needle_cue_{tag}_scratch_seed{seed}_uuid.json",
                          "niah_single_3", uuids, "0"))
    if every_eval:
        for phase in [p for p in phases if p["name"] in ("passkeys", "numbers")]:
            o = phase["options"]
            file = phase["out"].name.replace(f"_seed{seed}", f"_seed{seed}_every_eval")
            phases.append(cue(f"{phase['name']} every_eval", runs / f"{stem}_stage2", file, o["task"], o["per_cell"],
                              o["cues"], [EVERY_LAYER_FLOOR]))
    if stage16k:
        long_sets = [f"run.steps={steps['long16k']}"] + ([] if quick else ["run.seq_len=16384", "run.batch_size=1"])
        long_sets.append(f"data.seed={2000 + seed}")
        phases.append(stage("long16k", f"{stem}_long16k", long_sets, runs / f"{stem}_stage2", "_long16k"))
        if "niah_single_1" in tasks.split(","):
            phases.append(cue("long16k passkeys", runs / f"{stem}_long16k",
                              f"needle_cue_{tag}_scratch_long16k_seed{seed}.json", "niah_single_1", passkeys, "0"))
    if stage4k:
        long_sets = [f"run.steps={steps['long4k']}"] + ([] if quick else ["run.seq_len=4096", "run.batch_size=2"])
        long_sets.append(f"data.seed={3000 + seed}")
        phases.append(stage("long4k", f"{stem}_long4k", long_sets, runs / f"{stem}_stage2", "_long4k"))
    return phases


def command(phase: dict) -> str:
    return f"python -m experiments.{phase['module']} " + shlex.join(phase["argv"])


def finished(phase: dict) -> bool:
    """A needle_cue phase is done when its file exists with the same options (another file under
    that name is an error, not a result to reuse); a training stage is left to the driver, which
    skips a finished run and reuses its cached evaluation."""
    if phase["module"] != "needle_cue" or not phase["out"].exists():
        return False
    try:
        saved = json.loads(phase["out"].read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{phase['out']} exists but is not a needle_cue --out file ({error}); move it away")
    differ = {key: (saved.get(key), value) for key, value in phase["options"].items() if saved.get(key) != value}
    if differ:
        raise SystemExit(f"{phase['out']} was made with other options {differ} (saved, wanted); move it away")
    return True


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, help="a long-context variant (the lc_<variant> configs)")
    parser.add_argument("--seed", type=int, required=True, help="the run seed (stage 1's data seed)")
    parser.add_argument("--tag", help="names the runs and files (default: the variant); a new one for every --set "
                        "and --tasks")
    parser.add_argument("--tasks", default=TASKS, help=f"the task rows trained on and the stages' cells (default "
                        f"{TASKS}; the passkeys / numbers phases need niah_single_1 / niah_single_2 among them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training override of every stage (the model's: an intervention)")
    parser.add_argument("--numbers", type=int, default=0, metavar="N", help="also N numbers in the essays")
    parser.add_argument("--uuids", type=int, default=0, metavar="N", help="also N UUIDs in the essays")
    parser.add_argument("--stage16k", action="store_true", help="also the 16K-row stage (and its passkeys when "
                        "niah_single_1 is trained on)")
    parser.add_argument("--stage4k", action="store_true", help="also the stage of 4K rows (from stage 2)")
    parser.add_argument("--every-eval", action="store_true", help="also the passkeys (and numbers) with every "
                        "memory layer floored at evaluation, the same parameters")
    parser.add_argument("--runs", default="runs", help="where the runs and needle_cue files go")
    parser.add_argument("--results", metavar="DIR", help="copy every output here under its committed name")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--quick", action="store_true", help="every phase on the tiny preset (smoke test)")
    args = parser.parse_args(argv)
    if f"lc_{args.variant}" not in CONFIGS:
        parser.error(f"unknown variant {args.variant!r}; choose from "
                     f"{sorted(k[3:] for k in CONFIGS if k.startswith('lc_'))}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    for name in ("numbers", "uuids"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.set and not args.tag:
        parser.error("--set changes the model or its training: give it a --tag of its own (runs are named by tag)")
    tasks = args.tasks.split(",")
    unknown = [task for task in tasks if task not in LONG_CONTEXT_TASKS]
    if unknown or len(set(tasks)) != len(tasks):
        parser.error(f"--tasks {args.tasks!r}: give distinct tasks from {list(LONG_CONTEXT_TASKS)}")
    if args.tasks != TASKS and not args.tag:
        parser.error("--tasks changes the training: give it a --tag of its own (runs are named by tag)")
    if args.numbers and "niah_single_2" not in tasks:
        parser.error(f"--numbers evaluates niah_single_2, which --tasks {args.tasks!r} does not train on")
    if args.every_eval and CONFIGS[f"lc_{args.variant}"].arch in NO_MEMORY:
        parser.error(f"--every-eval floors the memory's layers; {args.variant!r} has no neural memory")
    if args.every_eval and "niah_single_1" not in tasks:
        parser.error(f"--every-eval evaluates the passkeys (niah_single_1), which --tasks {args.tasks!r} does not "
                     f"train on")
    floor_key = EVERY_LAYER_FLOOR.split("=")[0]
    if args.every_eval and any(s.partition("=")[0].strip() == floor_key and s.partition("=")[2].strip().lower()
                               in ("true", "1") for s in args.set):
        parser.error(f"--every-eval with --set {EVERY_LAYER_FLOOR}: the model is trained floored already")
    tag = args.tag or args.variant
    phases = plan(args.variant, args.seed, tag, args.set, pathlib.Path(args.runs), args.numbers, args.stage16k,
                  args.quick, args.tasks, args.uuids, args.stage4k, args.every_eval)
    results = pathlib.Path(args.results) if args.results else None
    for phase in phases:
        print(f"[recipe] {phase['name']}: {command(phase)}", flush=True)
        if args.dry_run:
            continue
        written = {}  # a stage's own report: another seed's run of the same tag may rewrite its folder's files
        if finished(phase):
            print(f"[recipe] {phase['name']}: {phase['out']} exists with these options, skipping", flush=True)
        elif phase["module"] == "long_context_table":
            from experiments import long_context_table

            files = long_context_table.main(phase["argv"])["files"]
            written = {phase["out"] / name: text for name, text in files.items()}
        else:
            from experiments import needle_cue

            needle_cue.main(phase["argv"])
        if results is not None:
            results.mkdir(parents=True, exist_ok=True)
            for source, name in phase["results"].items():
                if source in written:
                    (results / name).write_text(written[source])
                else:
                    shutil.copyfile(source, results / name)
    if not args.dry_run:
        from experiments.run_losses import run_losses

        for phase in phases:
            if phase["module"] == "long_context_table":
                run = phase["out"] / args.variant / f"seed{args.seed}"
                figures = run_losses(run)
                books = figures["books_bits_per_byte"]
                print(f"[recipe] {run}: loss {figures['loss']:.3f} (last 100 steps), books "
                      f"{'-' if books is None else f'{books:.3f}'} bits per byte", flush=True)
    return phases


if __name__ == "__main__":
    main()
