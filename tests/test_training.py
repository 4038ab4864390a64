"""The trainer: a short run, checkpoint save / restore with identical continuation (signal stop),
damaged-checkpoint fallback, refusal of a mismatched checkpoint, the optimiser schedule, and the
faults of the reliability pass: signals on save / final steps, a full disk, torn metrics, damaged
optimiser state, changed settings on resume, every checkpoint damaged, reruns of a finished run."""

import dataclasses
import json
import os
import pathlib
import signal
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax.models import ModelConfig
from titans_jax.training import (Checkpointer, OptimConfig, RunConfig, learning_rate_schedule, make_optimizer,
                                 read_metrics, train)

MODEL = ModelConfig(arch="mag", vocab_size=64, d_model=32, num_layers=1, num_heads=2, head_dim=16, mlp_hidden=64,
                    window=8, num_persistent=2, attention_block=16).replace({"lmm.memory.chunk_size": 4})
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=2)
RUN = RunConfig(steps=6, batch_size=2, seq_len=16, log_every=2, eval_every=0, eval_batches=2, save_every=2,
                keep_checkpoints=5, progress=False)


def batch(step: int) -> np.ndarray:
    return np.random.default_rng([7, step]).integers(0, MODEL.vocab_size, (RUN.batch_size, RUN.seq_len + 1))


def eval_windows():
    return [np.random.default_rng([8, i]).integers(0, MODEL.vocab_size, (2, RUN.seq_len + 1)) for i in range(2)]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = train(MODEL, OPTIM, RUN, out, batch, {"random": eval_windows}, meta={"tokenizer": "test"})
    return out, summary


def test_a_short_run_trains_evaluates_and_writes_its_logs(uninterrupted):
    out, summary = uninterrupted
    assert summary["step"] == RUN.steps and summary["resumed_from"] == 0
    steps = losses(out)
    assert sorted(steps) == list(range(1, RUN.steps + 1))
    assert steps[RUN.steps] < steps[1]  # it learns something even on random ids (the unigram)
    assert summary["eval"]["random"]["bits_per_token"] > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert json.loads((out / "summary.json").read_text())["step"] == RUN.steps


def test_stop_by_signal_then_resume_continues_identically(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted

    def stopping_batch(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-run; the loop saves after this step
        return batch(step)

    first = train(MODEL, OPTIM, RUN, tmp_path, stopping_batch, {"random": eval_windows}, meta={"tokenizer": "test"})
    assert first["stopped_by_signal"] == signal.SIGTERM and first["step"] == 3
    second = train(MODEL, OPTIM, RUN, tmp_path, batch, {"random": eval_windows}, meta={"tokenizer": "test"})
    assert second["resumed_from"] == 3 and second["step"] == RUN.steps
    assert losses(tmp_path) == losses(full_dir)  # bit-identical continuation
    assert second["eval"] == json.loads((full_dir / "summary.json").read_text())["eval"]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    shutil.copytree(full_dir / "checkpoints", tmp_path / "checkpoints")
    latest = tmp_path / "checkpoints" / str(RUN.steps)
    damaged = 0
    for path in latest.rglob("*"):
        if path.is_file() and "state" in path.parts and path.stat().st_size > 64:
            data = bytearray(path.read_bytes())
            data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
            path.write_bytes(bytes(data))
            damaged += 1
    assert damaged
    with pytest.warns(RuntimeWarning, match=f"checkpoint step {RUN.steps} .* damaged"):
        summary = train(MODEL, OPTIM, RUN, tmp_path, batch, {"random": eval_windows}, meta={"tokenizer": "test"})
    assert summary["resumed_from"] == RUN.steps - RUN.save_every
    assert losses(tmp_path)[RUN.steps] == losses(full_dir)[RUN.steps]


def test_a_checkpoint_of_another_tokenizer_is_refused(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    shutil.copytree(full_dir / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="tokenizer: 'test' -> 'other'"):
        train(MODEL, OPTIM, RUN, tmp_path, batch, meta={"tokenizer": "other"})


def test_optimizer_schedule_and_config_errors():
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        make_optimizer(OptimConfig(warmup_steps=10), total_steps=10)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        OptimConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="RunConfig.steps must be positive"):
        RunConfig(steps=0)
    # our optimizer's actual steps follow the schedule: with a constant gradient Adam's normalised
    # step is 1 per entry, so a vector (not weight-decayed) moves by exactly -lr(k) at step k
    config, total = OptimConfig(learning_rate=0.5, warmup_steps=2, min_lr_ratio=0.1), 10
    schedule = learning_rate_schedule(config, total)
    expected = [0.0, 0.25, 0.5] + [0.05 + 0.45 * 0.5 * (1 + np.cos(np.pi * (k - 2) / 8)) for k in range(3, 11)]
    np.testing.assert_allclose([float(schedule(k)) for k in range(11)], expected, rtol=1e-6, atol=1e-7)
    optimizer = make_optimizer(config, total)
    params = {"v": jnp.zeros(3)}
    opt_state = optimizer.init(params)
    grads = {"v": jnp.full(3, 1e-3)}
    moved = []
    for _ in range(total):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        moved.append(float(updates["v"][0]))
    np.testing.assert_allclose(moved, [-lr for lr in expected[:total]], rtol=1e-4, atol=1e-6)
    # with zero gradients only the weight decay moves anything: matrices decay, vectors do not
    params = {"m": jnp.ones((2, 2)), "v": jnp.ones(2)}
    opt_state = optimizer.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    for k in range(2):
        updates, opt_state = optimizer.update(zero, opt_state, params)
    assert float(updates["m"][0, 0]) == pytest.approx(-expected[1] * config.weight_decay)
    assert float(updates["v"][0]) == 0.0


def test_a_batch_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected \(2, 17\)"):
        train(MODEL, OPTIM, RUN, tmp_path, lambda step: np.zeros((2, 16), np.int64))


@pytest.mark.parametrize("bad, message", [
    ((batch(0), np.ones((2, 17), bool)), r"mask of shape \(2, 17\).*expected bool or float32 weights \(2, 16\)"),
    ((batch(0), np.ones((2, 16), np.float64)), "dtype float64"),
    ((batch(0), np.full((2, 16), -1.0, np.float32)), "negative or not finite"),
    ((batch(0), np.ones((2, 16), bool), None), "tuple of 3"),
    ((batch(0).astype(np.float32), np.ones((2, 16), bool)), "float32 ids"),
])
def test_a_bad_masked_batch_is_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        train(MODEL, OPTIM, RUN, tmp_path, lambda step: bad)


def test_a_masked_batch_trains_on_the_marked_targets_only():
    """(ids, mask) batches: an all-true mask is the plain step; otherwise the loss is the mean
    NLL of the marked targets and the gradient that of that mean."""
    from titans_jax.models import TitansLM
    from titans_jax.training import init_train_state, make_train_step, next_token_nll

    config = dataclasses.replace(MODEL, arch="swa")  # the loss is the architecture's business only through logits
    model, optimizer = TitansLM(config), make_optimizer(OPTIM, RUN.steps)
    state = jax.jit(lambda: init_train_state(config, optimizer, 0))()
    step = make_train_step(model, optimizer)
    tokens = jnp.asarray(batch(0))
    plain_state, plain = step(state, tokens)
    ones_state, ones = step(state, (tokens, jnp.ones((2, 16), bool)))
    np.testing.assert_allclose(float(ones["loss"]), float(plain["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ones_state["params"]), jax.tree.leaves(plain_state["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    mask = np.zeros((2, 16), bool)
    mask[0, 10:13] = mask[1, 15] = True  # an "answer" in each row
    _, masked = step(state, (tokens, jnp.asarray(mask)))
    direct = jax.jit(jax.value_and_grad(lambda p: next_token_nll(model, p, tokens, jnp.asarray(mask)), has_aux=True))
    (total, count), grads = direct(state["params"])
    assert float(count) == 4
    np.testing.assert_allclose(float(masked["loss"]), float(total / count), rtol=1e-6)
    np.testing.assert_allclose(float(masked["grad_norm"]), float(optax_norm(grads)) / 4, rtol=1e-5)
    for scale in (2.5, 0.01):  # equal weights give the same mean, also when they sum to less than 1
        weights = np.where(mask, np.float32(scale), np.float32(0)).astype(np.float32)
        _, weighted = step(state, (tokens, jnp.asarray(weights)))
        np.testing.assert_allclose(float(weighted["loss"]), float(masked["loss"]), rtol=1e-5)
    _, nothing = step(state, (tokens, jnp.zeros((2, 16), bool)))  # no target: loss 0, no update signal
    assert float(nothing["loss"]) == 0 and float(nothing["grad_norm"]) == 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
    run = RunConfig(steps=3, batch_size=2, seq_len=16, log_every=1, eval_every=0, save_every=3, progress=False)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=1, compute_dtype="bfloat16")
    summary = train(MODEL, optim, run, tmp_path, batch, {"random": eval_windows})
    assert summary["step"] == 3 and np.isfinite(summary["eval"]["random"]["nll"])
    assert all(np.isfinite(v) for v in losses(tmp_path).values())


# ----------------------------------------------------------------------------------------------
# Faults (the reliability pass)


def _copy_run(source: pathlib.Path, target: pathlib.Path, drop_steps=()) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)
    for step in drop_steps:
        shutil.rmtree(target / "checkpoints" / str(step))
    (target / "summary.json").unlink()


def _eval_rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]


def test_signals_on_save_and_final_steps_and_a_full_disk_in_a_real_process(uninterrupted, tmp_path):
    """A child process trains tiny runs while this test sends it real signals and limits its file
    size. Before the fixes: a signal on a save step (every step with save_every=1) or on the final
    step crashed with orbax's StepAlreadyExistsError, and a failed background save surfaced only
    at the next save, buried in asyncio tracebacks."""
    full_dir, _ = uninterrupted
    scenarios = [
        {"out": "every-step", "run": {"save_every": 1}, "signal_at": 2, "signal": "SIGINT"},
        {"out": "every-step", "run": {"save_every": 1}},
        {"out": "final", "signal_at": RUN.steps - 1, "signal": "SIGTERM"},
        {"out": "final"},
        {"out": "final"},
        {"out": "disk-full", "run": {"keep_checkpoints": 1}, "disk_full_at": 2},
        {"out": "disk-full", "run": {"keep_checkpoints": 1}},
    ]
    child = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).with_name("train_fault_child.py")),
                              str(tmp_path), json.dumps(scenarios)], stdout=subprocess.PIPE,
                             stderr=open(tmp_path / "child.err", "w"),  # a file: orbax's noise must not fill a pipe
                             text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    signals = iter([getattr(signal, s["signal"]) for s in scenarios if "signal" in s])
    marker, deadline = tmp_path / "signal-me", time.time() + 600
    while child.poll() is None and time.time() < deadline:
        if marker.exists():
            child.send_signal(next(signals))
            time.sleep(0.05)
            marker.unlink()
        time.sleep(0.01)
    stdout, _ = child.communicate(timeout=60)
    stderr = (tmp_path / "child.err").read_text()
    assert child.returncode == 0, stderr[-3000:]
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(scenarios), stdout + stderr[-3000:]
    reference = losses(full_dir)

    # 1. SIGINT while every step is a save step: one save, a clean stop, then an exact resume
    stopped, resumed = results[0]["summary"], results[1]["summary"]
    assert stopped["stopped_by_signal"] == signal.SIGINT and stopped["step"] == 3 and "eval" not in stopped
    assert resumed["resumed_from"] == 3 and resumed["completed"] and losses(tmp_path / "every-step") == reference
    # 2. SIGTERM on the final (save) step: saved once, no evaluation; the rerun evaluates once,
    #    and a rerun of the finished run writes nothing and reports the recorded results
    stopped, evaluated, again = (results[i]["summary"] for i in (2, 3, 4))
    assert stopped["stopped_by_signal"] == signal.SIGTERM and stopped["step"] == RUN.steps and "eval" not in stopped
    assert evaluated["resumed_from"] == RUN.steps and evaluated["eval"] == json.loads(
        (full_dir / "summary.json").read_text())["eval"]
    assert again["already_finished"] and again["eval"] == evaluated["eval"]
    assert len(_eval_rows(tmp_path / "final")) == 1 and losses(tmp_path / "final") == reference
    # 3. a full disk from step 3 on (step 2's save committed): one clear line naming the step, the directory and the
    #    cause, raised before the next save; the earlier checkpoint survives and the run resumes
    failed = results[5]
    assert failed["error"] == "CheckpointSaveError" and not failed["chained"], failed
    assert "saving checkpoint step 4 to " in failed["message"] and str(tmp_path / "disk-full") in failed["message"]
    assert "File too large" in failed["message"] and "[2] are intact" in failed["message"]
    assert "\n" not in failed["message"] and len(failed["message"]) < 1000  # one line
    recovered = results[6]["summary"]
    assert recovered["resumed_from"] == 2 and losses(tmp_path / "disk-full") == reference


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_the_run_resumes(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    _copy_run(full_dir, tmp_path, drop_steps=[RUN.steps])
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text()[:-9])  # killed mid-write: the last line is cut short, no newline
    with pytest.warns(RuntimeWarning, match="dropped a torn last line"):
        summary = train(MODEL, OPTIM, RUN, tmp_path, batch, {"random": eval_windows}, meta={"tokenizer": "test"})
    assert summary["resumed_from"] == RUN.steps - RUN.save_every and losses(tmp_path) == losses(full_dir)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ['{"step": 3, "lo'] + lines[2:]) + "\n")  # damage mid-file: refused
    with pytest.raises(ValueError, match="metrics.jsonl line 3 is damaged"):
        read_metrics(path)


def test_optimizer_state_damage_that_orbax_restores_is_caught_by_the_digest(uninterrupted, tmp_path):
    """A checkpoint whose Adam second moment differs from what was saved (orbax restores it without
    complaint) used to restore silently: the digest covered the parameters only."""
    full_dir, _ = uninterrupted
    _copy_run(full_dir, tmp_path)
    optimizer = make_optimizer(OPTIM, RUN.steps)
    from titans_jax.training import init_train_state

    abstract = jax.eval_shape(lambda: init_train_state(MODEL, optimizer, RUN.seed))
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=5)
    ocp = checkpointer._ocp
    latest = RUN.steps
    restored = checkpointer.manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["meta"]
    leaves, treedef = jax.tree.flatten(state["opt_state"])
    index = max(range(len(leaves)), key=lambda i: leaves[i].size)  # a moment of the largest matrix
    leaves[index] = leaves[index].at[(0,) * leaves[index].ndim].set(9.6e35)
    tampered = dict(state, opt_state=jax.tree.unflatten(treedef, leaves))
    checkpointer.manager.delete(latest)
    checkpointer.manager.save(latest, args=ocp.args.Composite(state=ocp.args.StandardSave(tampered),
                                                               meta=ocp.args.JsonSave(meta)), force=True)
    checkpointer.close()
    with pytest.warns(RuntimeWarning, match=f"checkpoint step {latest} .* damaged .*does not match the digest"):
        summary = train(MODEL, OPTIM, RUN, tmp_path, batch, {"random": eval_windows}, meta={"tokenizer": "test"})
    assert summary["resumed_from"] == latest - RUN.save_every and losses(tmp_path) == losses(full_dir)


def test_a_refused_resume_writes_nothing_and_names_the_differing_fields(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    _copy_run(full_dir, tmp_path)
    (tmp_path / "config.json").write_text('{"the": "original"}')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    wider = MODEL.replace(mlp_hidden=96)
    with pytest.raises(ValueError) as refused:
        train(wider, OPTIM, RUN, tmp_path, batch, meta={"tokenizer": "test"}, run_record={"the": "new"})
    message = str(refused.value)
    assert "model_config.mlp_hidden: 64 -> 96" in message and len(message) < 400, message
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # config.json, metrics and checkpoints untouched


def test_changed_optimizer_settings_are_refused_unless_allowed_and_then_recorded(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    _copy_run(full_dir, tmp_path, drop_steps=[RUN.steps])
    faster = OptimConfig(learning_rate=2e-2, warmup_steps=2)
    with pytest.raises(ValueError, match=r"optim.learning_rate: 0.01 -> 0.02.*--allow-changes"):
        train(MODEL, faster, RUN, tmp_path, batch, meta={"tokenizer": "test"})
    with pytest.raises(ValueError, match="total_steps: 6 -> 8"):
        train(MODEL, OPTIM, dataclasses.replace(RUN, steps=8), tmp_path, batch, meta={"tokenizer": "test"})
    summary = train(MODEL, faster, RUN, tmp_path, batch, meta={"tokenizer": "test"}, run_record={"run": "x"},
                    allow_changes=True)
    change = {"step": 4, "field": "optim.learning_rate", "from": 0.01, "to": 0.02}
    assert summary["resumed_from"] == 4 and summary["changes"] == [change]
    assert json.loads((tmp_path / "config.json").read_text())["changes"] == [change]
    assert losses(tmp_path)[5] == losses(full_dir)[5] and losses(tmp_path)[6] != losses(full_dir)[6]  # new rate from step 5
    # the change travels with the checkpoints written after it (a later resume reports it)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    ocp = checkpointer._ocp
    meta = checkpointer.manager.restore(RUN.steps, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    checkpointer.close()
    assert meta["changes"] == [change] and meta["optim"]["learning_rate"] == 2e-2


def test_when_every_checkpoint_is_damaged_the_restart_is_announced(uninterrupted, tmp_path):
    full_dir, _ = uninterrupted
    _copy_run(full_dir, tmp_path)
    for path in (tmp_path / "checkpoints").rglob("*"):
        if path.is_file() and "state" in path.parts and path.stat().st_size > 64:
            path.write_bytes(bytes(path.stat().st_size))
    with pytest.warns(RuntimeWarning) as warned:
        summary = train(MODEL, OPTIM, RUN, tmp_path, batch, {"random": eval_windows}, meta={"tokenizer": "test"})
    messages = [str(w.message) for w in warned]
    assert any("every checkpoint in" in m and "starts again from step 0" in m for m in messages), messages
    assert summary["resumed_from"] == 0 and losses(tmp_path) == losses(full_dir)
    kept = list(tmp_path.glob("metrics.before-restart-*.jsonl"))
    assert len(kept) == 1 and len(read_metrics(kept[0])) == len(read_metrics(full_dir / "metrics.jsonl"))


def test_a_run_can_start_from_given_parameters_on_longer_rows(tmp_path):
    from titans_jax.models import TitansLM, init_params
    from titans_jax.training import next_token_nll

    params = init_params(MODEL, jax.random.PRNGKey(123))  # not the run seed's initialisation
    longer = dataclasses.replace(RUN, seq_len=24, steps=4)

    def longer_batch(step):
        return np.random.default_rng([9, step]).integers(0, MODEL.vocab_size, (2, 25))

    train(MODEL, OPTIM, longer, tmp_path, longer_batch, meta={"tokenizer": "test"}, initial_params=params)
    # the first step's loss is the given parameters' loss on its batch (not a fresh initialisation's)
    nll, count = next_token_nll(TitansLM(MODEL), params, jnp.asarray(longer_batch(0)))
    assert losses(tmp_path)[1] == pytest.approx(float(nll / count), rel=1e-5)
    # resuming it from other initial parameters is refused: they are part of the run's identity
    other = jax.tree.map(lambda leaf: leaf * 0.5, params)
    with pytest.raises(ValueError, match="initial_params_sha256"):
        train(MODEL, OPTIM, longer, tmp_path, longer_batch, meta={"tokenizer": "test"}, initial_params=other)
    wrong = {**params, "embed": jax.tree.map(lambda leaf: leaf[:, :8], params["embed"])}
    with pytest.raises(ValueError, match="initial_params.*embed"):
        train(MODEL, OPTIM, longer, tmp_path / "wrong", longer_batch, initial_params=wrong)
    with pytest.raises(ValueError, match="do not have the model's parameters"):
        train(MODEL, OPTIM, longer, tmp_path / "wrong", longer_batch, initial_params={"embed": params["embed"]})
