"""The trainer: a short run, checkpoint save / restore with identical continuation (signal stop),
damaged-checkpoint fallback, refusal of a mismatched checkpoint, the optimiser schedule."""

import json
import os
import pathlib
import signal
import shutil

import numpy as np
import optax
import pytest

from titans_jax.models import ModelConfig
from titans_jax.training import OptimConfig, RunConfig, make_optimizer, read_metrics, train

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
    with pytest.raises(ValueError, match="tokenizer='test'.*'other'"):
        train(MODEL, OPTIM, RUN, tmp_path, batch, meta={"tokenizer": "other"})


def test_optimizer_schedule_and_config_errors():
    with pytest.raises(ValueError, match="must exceed warmup_steps"):
        make_optimizer(OptimConfig(warmup_steps=10), total_steps=10)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        OptimConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="RunConfig.steps must be positive"):
        RunConfig(steps=0)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 10, 0.1)
    assert float(schedule(0)) == 0.0 and float(schedule(2)) == pytest.approx(1.0)
    assert float(schedule(10)) == pytest.approx(0.1)


def test_a_batch_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected \(2, 17\)"):
        train(MODEL, OPTIM, RUN, tmp_path, lambda step: np.zeros((2, 16), np.int64))


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
    run = RunConfig(steps=3, batch_size=2, seq_len=16, log_every=1, eval_every=0, save_every=3, progress=False)
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=1, compute_dtype="bfloat16")
    summary = train(MODEL, optim, run, tmp_path, batch, {"random": eval_windows})
    assert summary["step"] == 3 and np.isfinite(summary["eval"]["random"]["nll"])
    assert all(np.isfinite(v) for v in losses(tmp_path).values())
