"""Expert training (t2_jax._options, t2_jax._experts): the option policy against direct
computations, the REINFORCE estimator on a bandit, SVF and LoRA updates on a tiny model, exact
resume after an interruption, saved experts and their base check, the generative path, bad
configurations, and the Table 1 driver's --quick run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import _experts as X
from t2_jax import _options as O
from t2_jax import testing

CONFIG = testing.TINY


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_params(), testing.ByteTokenizer()


@pytest.fixture(scope="module")
def choice_examples():
    return testing.synthetic_task("choice", n=48, seed=3)


def _direct_loglik(params, prompt_ids, option_ids):
    """log p(option | prompt) from one unpadded, uncached forward of prompt + option."""
    tokens = np.asarray([prompt_ids + option_ids], np.int32)
    logits, _ = t2_jax.apply(params, CONFIG, tokens)
    logprobs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float64 if jax.config.x64_enabled
                                                               else jnp.float32), -1))
    start = len(prompt_ids)
    return float(sum(logprobs[start - 1 + j, t] for j, t in enumerate(option_ids)))


def test_option_loglik_matches_reference_and_direct(tiny, choice_examples):
    params, tokenizer = tiny
    batch = O.encode_choices(tokenizer, choice_examples[:6], num_options=5)
    assert batch.valid.sum(1).tolist() == [4, 3, 4, 3, 4, 3]  # empty slots are padded
    fast = np.asarray(O.option_loglik(params, CONFIG, batch.prompt, batch.prompt_mask, batch.options,
                                      batch.option_mask))
    reference = O.option_loglik_reference(params, CONFIG, batch)
    np.testing.assert_allclose(np.where(batch.valid, fast, 0), reference, rtol=2e-5, atol=2e-5)
    assert np.all(fast[~batch.valid] == 0)
    for b, example in enumerate(choice_examples[:6]):
        for n, choice in enumerate(example.choices):
            direct = _direct_loglik(params, tokenizer.encode(example.prompt), tokenizer.encode(" " + choice))
            assert fast[b, n] == pytest.approx(direct, rel=2e-5, abs=2e-5)


def test_option_policy_normalisations(tiny, choice_examples):
    params, tokenizer = tiny
    batch = O.encode_choices(tokenizer, choice_examples[:4], num_options=4)
    loglik = O.option_loglik(params, CONFIG, batch.prompt, batch.prompt_mask, batch.options, batch.option_mask)
    tokens = batch.option_mask.sum(-1)
    for normalisation, divide in (("token", tokens), ("char", batch.chars), ("sum", 1)):
        scores = np.asarray(O.normalise(loglik, batch.option_mask, batch.valid, batch.chars, normalisation))
        expected = np.where(batch.valid, np.asarray(loglik) / np.maximum(divide, 1), -np.inf)
        np.testing.assert_allclose(scores, expected, rtol=1e-6)
        pi = np.exp(np.asarray(O.option_policy(jnp.asarray(scores))))
        np.testing.assert_allclose(pi.sum(-1), 1.0, rtol=1e-6)
        assert np.all(pi[~batch.valid] == 0)
        direct = np.exp(expected - expected.max(-1, keepdims=True))
        np.testing.assert_allclose(pi, direct / direct.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="normalisation"):
        O.normalise(loglik, batch.option_mask, batch.valid, batch.chars, "bits")
    with pytest.raises(ValueError, match="options, more than"):
        O.encode_choices(tokenizer, choice_examples[:4], num_options=3)
    with pytest.raises(ValueError, match="not a multiple-choice"):
        O.encode_choices(tokenizer, testing.synthetic_task("numeric", n=2))


def test_reinforce_gradient_on_a_bandit():
    """E[grad loss] = -grad E[r] = -2 pi_g (e_g - pi) for r = +1 (gold) / -1: the estimator's
    sample mean agrees, and a step against it raises the gold arm's probability."""
    theta = jnp.asarray([0.3, -0.2, 0.1, 0.0])
    gold = 2
    B = 200_000

    def loss(theta, key):
        logpi = jnp.broadcast_to(jax.nn.log_softmax(theta), (B, 4))
        return X.option_reinforce(logpi, jnp.full((B,), gold), key)[0]

    grad = np.asarray(jax.grad(loss)(theta, jax.random.key(0)))
    pi = np.asarray(jax.nn.softmax(theta))
    expected = -2 * pi[gold] * (np.eye(4)[gold] - pi)
    np.testing.assert_allclose(grad, expected, atol=0.01)
    assert grad[gold] < 0 and all(grad[i] > 0 for i in range(4) if i != gold)
    stepped = jax.nn.softmax(theta - 1.0 * grad)
    assert float(stepped[gold]) > float(pi[gold])


@pytest.mark.parametrize("method", ["svf", "lora"])
def test_updates_raise_gold_probability_on_a_fixed_batch(tiny, choice_examples, method):
    params, tokenizer = tiny
    config = X.ExpertConfig(task="synthetic", method=method, form="paper", learning_rate=0.05, clip_norm=1.0,
                            train_size=16, batch_size=8)
    adapter = X.make_adapter(params, config)
    arrays = X._choice_arrays(O.encode_choices(tokenizer, choice_examples[:8], num_options=4))
    statics = {"adapt": adapter.adapt, "model_config": CONFIG}
    loss_fn = (X.functools.partial(X.reinforce_choice_loss, normalisation="token", kl_coef=0.1, **statics)
               if method == "svf" else X.functools.partial(X.lora_choice_loss, **statics))
    update = X._update_program(loss_fn, X.make_optimizer(config))
    trainable = adapter.init(jax.random.key(1))
    opt_state = X.make_optimizer(config).init(trainable)

    def gold_logpi(trainable):
        adapted = adapter.adapt(params, adapter.constants, trainable)
        logpi = O.option_policy(X._scores(adapted, CONFIG, arrays, "token"))
        return float(jnp.mean(jnp.take_along_axis(logpi, arrays["gold"][:, None], -1)))

    before = gold_logpi(trainable)
    base_logpi = O.option_policy(X._scores(params, CONFIG, arrays, "token"))
    for i in range(15):
        kwargs = {"base_logpi": base_logpi} if method == "svf" else {}
        trainable, opt_state, loss, metrics, grad_norm = update(trainable, opt_state, params, adapter.constants,
                                                                (arrays, jax.random.key(100 + i)), kwargs)
        assert np.isfinite(float(loss)) and float(grad_norm) > 0
    assert gold_logpi(trainable) > before + 0.05
    if method == "svf":
        assert float(metrics["kl"]) >= 0


def test_lora_starts_at_the_base_and_counts(tiny):
    params, _ = tiny
    config = X.ExpertConfig(task="t", method="lora", lora_rank=4)
    adapter = X.make_adapter(params, config)
    trainable = adapter.init(jax.random.key(0))
    testing.assert_trees_close(adapter.adapt(params, adapter.constants, trainable), params)
    L, D, H, E, K = CONFIG.num_layers, CONFIG.hidden_size, CONFIG.num_heads, CONFIG.head_dim, CONFIG.num_kv_heads
    assert X.trainable_count(trainable) == L * 4 * ((D + H * E) + (D + K * E))
    svf = X.make_adapter(params, X.ExpertConfig(task="t"), t2_jax.compute_svd(params))
    F = CONFIG.intermediate_size
    assert X.trainable_count(svf.init(jax.random.key(0))) == L * 3 * min(D, F)


def _run(tmp_path, name, tiny, examples, tokenizer=None, **changes):
    params, byte_tokenizer = tiny
    config = X.ExpertConfig(**{"task": "synthetic_choice", "train_size": 16, "validation_size": 8,
                               "test_size": 8, "steps": 4, "batch_size": 4, "validate_every": 2,
                               "eval_batch": 8, **changes})
    return X.train_expert(config, params, CONFIG, tokenizer or byte_tokenizer, tmp_path / name, examples=examples,
                          base_name="tiny", progress=False)


@pytest.mark.parametrize("method", ["svf", "lora"])
def test_interrupted_run_resumes_to_the_same_expert(tmp_path, tiny, choice_examples, method, monkeypatch):
    straight = _run(tmp_path, "straight", tiny, choice_examples, method=method)
    assert straight["completed"] and straight["step"] == 4
    real_batch_indices = X.batch_indices

    def crash_at_step_2(num_examples, batch_size, seed, step):
        if step == 2:
            raise RuntimeError("interrupted")
        return real_batch_indices(num_examples, batch_size, seed, step)

    monkeypatch.setattr(X, "batch_indices", crash_at_step_2)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run(tmp_path, "resumed", tiny, choice_examples, method=method)
    monkeypatch.setattr(X, "batch_indices", real_batch_indices)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    resumed = _run(tmp_path, "resumed", tiny, choice_examples, method=method)
    assert resumed["resumed_from"] == 2 and resumed["completed"]
    expert_a, meta_a = _load(tmp_path / "straight", tiny[0], method)
    expert_b, _ = _load(tmp_path / "resumed", tiny[0], method)
    testing.assert_trees_close(expert_b, expert_a)
    losses = lambda d: [r["loss"] for r in X.loop_lib.read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert resumed["eval"]["test"]["per_question"] == straight["eval"]["test"]["per_question"]
    assert meta_a["task"] == "synthetic_choice" and meta_a["method"] == method
    assert int(meta_a["selected_step"]) in (0, 2, 4) and "best validation accuracy" in meta_a["selection"]
    rerun = _run(tmp_path, "straight", tiny, choice_examples, method=method)
    assert rerun.get("already_finished")


def _load(run_dir, params, method):
    if method == "svf":
        return t2_jax.load_expert(run_dir / "expert.safetensors", params=params)
    return X.load_lora(run_dir / "expert.safetensors", params)


def test_saved_experts_refuse_another_base(tmp_path, tiny, choice_examples):
    params, _ = tiny
    for method in ("svf", "lora"):
        _run(tmp_path, method, tiny, choice_examples, method=method, steps=2)
        other = testing.tiny_params(seed=5)
        with pytest.raises(t2_jax.ExpertMismatchError):
            _load(tmp_path / method, other, method)
        trainable, meta = _load(tmp_path / method, params, method)
        assert meta["base_fingerprint"] == t2_jax.fingerprint(params)
        assert float(meta["validation_accuracy"]) >= 0 and meta["base"] == "tiny"
    # the adapter file carries its scale: applied alone, it scores the test pool as the run did
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    adapted = t2_jax.apply_lora(params, tmp_path / "lora" / "expert.safetensors")
    by_id = {e.id: e for e in choice_examples}
    test = [by_id[i] for i in json.loads((tmp_path / "lora" / "config.json").read_text())["pools"]["test"]]
    again = t2_jax.Evaluator(CONFIG, tiny[1], test, 8)(adapted)
    assert again["accuracy"] == summary["eval"]["test"]["accuracy"]
    assert again["logpi_gold"] == pytest.approx(summary["eval"]["test"]["logpi_gold"], rel=1e-5)
    config = json.loads((tmp_path / "svf" / "config.json").read_text())
    pools = config["pools"]
    assert not set(pools["train"]) & set(pools["test"]) and not set(pools["validation"]) & set(pools["test"])


def test_generative_reinforce(tmp_path, tiny):
    """Numeric examples: greedy rollouts, +1/-1 rewards from numeric_reward, and the loss is
    -mean(r * sum of the generated ids' log-probs) as computed directly."""
    params, tokenizer = tiny
    examples = testing.synthetic_task("numeric", n=24)
    summary = _run(tmp_path, "numeric", tiny, examples, task="synthetic_numeric", steps=2, max_new_tokens=6,
                   validation_size=4, test_size=4)
    assert summary["completed"] and summary["eval"]["test"]["count"] == 4
    records = [r for r in X.loop_lib.read_metrics(tmp_path / "numeric" / "metrics.jsonl") if "rollout_s" in r]
    assert len(records) == 2 and all(r["reward"] in (-1.0, -0.5, 0.0, 0.5, 1.0) for r in records)
    adapter = X.make_adapter(params, X.ExpertConfig(task="t", form="paper"))
    trainable = adapter.init(None)
    rewards, rollouts, _ = X.generate_and_reward(params, CONFIG, tokenizer, examples[:4], 4, 6)
    prompt, mask, tokens, token_mask = rollouts[0]
    loss, _ = X.reinforce_sequence_loss(trainable, params, adapter.constants, prompt, mask, tokens, token_mask,
                                        rewards, adapt=adapter.adapt, model_config=CONFIG, kl_coef=0.0)
    logprobs = t2_jax.continuation_logprobs(params, CONFIG, prompt, mask, tokens, token_mask)
    assert float(loss) == pytest.approx(-float(np.mean(rewards * np.asarray(logprobs).sum(-1))), rel=1e-4)
    kl_loss, metrics = X.reinforce_sequence_loss(trainable, params, adapter.constants, prompt, mask, tokens,
                                                 token_mask, rewards, adapt=adapter.adapt, model_config=CONFIG,
                                                 kl_coef=0.5, base_params=params)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-4)  # z = 1: the adapted model is the base
    assert float(kl_loss) == pytest.approx(float(loss), rel=1e-3, abs=1e-4)


def test_bad_configurations():
    with pytest.raises(ValueError, match="method"):
        X.ExpertConfig(task="t", method="dora")
    with pytest.raises(ValueError, match="exceeds train_size"):
        X.ExpertConfig(task="t", batch_size=64, train_size=16)
    with pytest.raises(ValueError, match="normalisation"):
        X.ExpertConfig(task="t", normalisation="bits")
    with pytest.raises(ValueError, match="unknown SVF form"):
        X.ExpertConfig(task="t", form="svd")
    with pytest.raises(ValueError, match="learning_rate"):
        X.ExpertConfig(task="t", learning_rate=0.0)
    from t2_jax import train as cli

    with pytest.raises(SystemExit, match="no field 'stepz'"):
        cli.parse_overrides(["stepz=3"])
    with pytest.raises(SystemExit, match="expected an integer"):
        cli.parse_overrides(["steps=many"])
    with pytest.raises(SystemExit, match="unknown task"):
        cli.main(["--task", "nope", "--out", "/tmp/never"])


def test_wilson_interval():
    low, high = X.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert X.wilson_interval(0, 10)[0] == 0.0 and X.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert X.wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-3)


def test_table1_quick(tmp_path):
    from experiments import t2_table1

    table = t2_table1.main(["--quick", "--out", str(tmp_path / "q"), "--seeds", "0,1", "--no-progress"])
    entry = table["tasks"]["synthetic_choice"]
    assert set(entry["methods"]) == {"svf", "lora"}
    for method in entry["methods"].values():
        assert method["seeds"] == [0, 1] and len(method["runs"]) == 2
        assert 0 <= method["accuracy"] <= 1 and method["trainable_parameters"] > 0
    assert (tmp_path / "q" / "table1.md").read_text().startswith("| task | base |")
    assert (tmp_path / "q" / "curves.png").stat().st_size > 0
