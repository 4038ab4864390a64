"""The training CLI on tiny fixture corpora written by the test: every experiment config loads, a
run killed with SIGKILL mid-way and resumed gives the losses of an uninterrupted run, and
missing data / vocabulary mismatches / bad overrides give clear errors."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments import configs
from titans_jax.data import ByteTokenizer, load_tokens
from titans_jax.data.testing import write_fixture_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_RUN = ["--set", "preset=tiny", "--set", "run.steps=12", "--set", "run.batch_size=2", "--set", "run.seq_len=32",
            "--set", "run.save_every=3", "--set", "run.log_every=1", "--set", "run.eval_batches=2",
            "--set", "run.sample_tokens=8", "--set", "optim.warmup_steps=2", "--set", "data.eval_corpora=books",
            "--no-progress"]


@pytest.fixture(scope="module")
def fixture_cache(tmp_path_factory):
    """A cache with tiny 'books' built from the test's own text through the real pipeline."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TITANS_JAX_CACHE", str(root))
        write_fixture_cache(root)
    return root


def run_cli(args, cache, **kwargs):
    env = dict(os.environ, TITANS_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def losses(run_dir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_every_experiment_config_loads_and_builds_its_model():
    for name in configs.CONFIGS:
        config = configs.get_config(name)
        model_config = config.model_config(vocab_size=256)
        assert model_config.vocab_size == 256, name
    with pytest.raises(ValueError, match="unknown experiment config"):
        configs.get_config("table_everything")


def test_overrides_are_typed_and_reach_the_model_and_bad_ones_are_refused():
    quick = configs.get_config("quick")
    config = configs.apply_overrides(quick, [
        "run.steps=7", "optim.learning_rate=1e-4", "model.lmm.use_momentum=false", "arch=mag",
        "data.eval_corpora=code", "model.lmm.memory.impl=reference", "model.norm_eps=1e-5"])
    # the values arrive typed, and what was set reaches the model that is built (not only the
    # override list); fields not named keep the named config's values
    assert config.run == dataclasses.replace(quick.run, steps=7) and type(config.run.steps) is int
    assert config.optim == dataclasses.replace(quick.optim, learning_rate=1e-4)
    assert config.data.eval_corpora == ("code",)
    model = config.model_config(vocab_size=256)
    assert model.arch == "mag" and model.d_model == 128 and model.lmm.memory.chunk_size == 16
    layer = model.memory_layer
    assert layer.use_momentum is False and layer.memory_config.impl == "reference"
    assert layer.norm_eps == 1e-5 and layer.memory_config.norm_eps == 1e-5  # the model's eps reaches the memory
    # model.arch is the experiment's architecture (it used to crash preset() with a TypeError)
    assert configs.apply_overrides(quick, ["model.arch=ttt"]).model_config().memory_layer.use_momentum is False
    for bad, message in [("run.stepz=3", "RunConfig has no field 'stepz'"), ("model.depth=2", "ModelConfig has no field"),
                         ("steps", "key=value"), ("run.steps=abc", r"run.steps='abc': expected an integer"),
                         ("model.d_model=1.5", r"model.d_model='1.5': expected an integer"),
                         ("optim.learning_rate=fast", r"optim.learning_rate='fast': expected a number"),
                         ("lr=fast", "unknown override 'lr'"), ("model.lmm.memory.impl=fastest", "impl must be one of"),
                         ("model.lmm=3", "nested config"), ("data.corpus=poems", "unknown corpus"),
                         ("run.steps=0", "run.steps=0: RunConfig.steps must be positive")]:
        with pytest.raises(ValueError, match=message):
            configs.apply_overrides(quick, [bad])


def test_a_vocabulary_override_that_conflicts_with_the_tokenizer_is_refused():
    config = configs.apply_overrides(configs.get_config("quick"), ["model.vocab_size=100"])
    with pytest.raises(ValueError, match="model.vocab_size=100 conflicts with the tokenizer's vocabulary of 256"):
        config.model_config(vocab_size=256)
    same = configs.apply_overrides(configs.get_config("quick"), ["model.vocab_size=256"])
    assert same.model_config(vocab_size=256).vocab_size == 256


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reproduces_the_uninterrupted_losses(fixture_cache, tmp_path):
    full = run_cli(["--config", "quick", "--out", str(tmp_path / "full"), *TINY_RUN], fixture_cache)
    output, _ = full.communicate(timeout=600)
    assert full.returncode == 0, output
    killed_dir = tmp_path / "killed"
    victim = run_cli(["--config", "quick", "--out", str(killed_dir), *TINY_RUN], fixture_cache)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it once it is past a checkpoint, mid-way
        if (killed_dir / "metrics.jsonl").exists() and max(losses(killed_dir), default=0) >= 7:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert max(losses(killed_dir)) < 12
    resumed = run_cli(["--config", "quick", "--out", str(killed_dir), *TINY_RUN], fixture_cache)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert 3 <= summary["resumed_from"] < 12
    assert losses(killed_dir) == losses(tmp_path / "full")


def test_missing_data_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_JAX_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m titans_jax.data.fetch books"):
        load_tokens("books", "train", ByteTokenizer())


@pytest.mark.slow  # the same refusal is tested in-process in test_training.py
def test_a_checkpoint_of_another_vocabulary_is_refused(fixture_cache, tmp_path):
    args = ["--config", "quick", "--out", str(tmp_path), *TINY_RUN, "--set", "run.steps=3"]
    first = run_cli(args, fixture_cache)
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output
    config_before = (tmp_path / "config.json").read_text()
    second = run_cli(args + ["--set", "data.tokenizer=bpe", "--set", "data.bpe_vocab_size=300"], fixture_cache)
    output, _ = second.communicate(timeout=600)
    assert second.returncode != 0 and "belongs to another run" in output and "Use another run directory" in output
    assert "model_config.vocab_size: 256 -> " in output and "tokenizer: " in output
    assert (tmp_path / "config.json").read_text() == config_before  # the refused run wrote nothing
