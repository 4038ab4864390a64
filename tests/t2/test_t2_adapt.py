"""Few-shot CEM adaptation (t2_jax._adapt): CEM finds known optima (also through tie-breaks),
keeps the best member, and the batched population fitness equals scoring each mix alone; a
one-hot mix scores exactly as its expert; the whole search runs on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import _adapt as A
from t2_jax import _experts as X
from t2_jax import _options as O
from t2_jax import testing

CONFIG = testing.TINY


def test_cem_finds_a_known_optimum():
    target = np.asarray([0.2, 0.7, 0.9, 0.0])
    result = A.cem(lambda pop: (-np.sum((pop - target) ** 2, 1), np.zeros(len(pop))), 4,
                   A.CEMConfig(generations=30, seed=1))
    np.testing.assert_allclose(result.alpha, target, atol=0.05)
    best = [h["best"] for h in result.history]
    assert best == sorted(best)  # the best so far is kept (member 0 of every later generation)
    assert result.fitness[0] == pytest.approx(-np.sum((result.alpha - target) ** 2))


def test_cem_climbs_through_tie_breaks():
    """An accuracy-like fitness (few distinct values) with a continuous tie-break, as on few shots."""
    target = np.asarray([0.9, 0.1])
    distance = lambda pop: np.sqrt(np.sum((pop - target) ** 2, 1))  # noqa: E731
    result = A.cem(lambda pop: (np.floor(4 * (1 - distance(pop))) / 4, -distance(pop)), 2,
                   A.CEMConfig(generations=25, population=16))
    np.testing.assert_allclose(result.alpha, target, atol=0.08)


def test_cem_rejects_bad_settings():
    with pytest.raises(ValueError, match="elite_ratio"):
        A.CEMConfig(elite_ratio=0)
    with pytest.raises(ValueError, match="population"):
        A.CEMConfig(population=1)
    with pytest.raises(ValueError, match="two"):
        A.cem(lambda pop: (np.zeros(3), np.zeros(3)), 2, A.CEMConfig(population=4, generations=1))


@pytest.fixture(scope="module")
def setup():
    params = testing.tiny_params()
    svd = t2_jax.compute_svd(params)
    experts = [t2_jax.init_expert(svd, "released", jax.random.key(k), noise_std=1.0) for k in range(3)]
    examples = testing.synthetic_task("choice", n=8, seed=2)
    tokenizer = testing.ByteTokenizer()
    arrays = X._choice_arrays(O.encode_choices(tokenizer, examples))
    return params, svd, experts, examples, tokenizer, arrays


def _direct(params, svd, expert_or_z, form, arrays):
    adapted = t2_jax.factorise(params, svd, expert_or_z, form)
    loglik = O.option_loglik(adapted, CONFIG, arrays["prompt"], arrays["prompt_mask"], arrays["options"],
                             arrays["option_mask"])
    scores = O.normalise(loglik, arrays["option_mask"], arrays["valid"], arrays["chars"], "token")
    accuracy = float(jnp.mean(jnp.argmax(scores, -1) == arrays["gold"]))
    return accuracy, float(jnp.mean(jnp.take_along_axis(loglik, arrays["gold"][:, None], -1)))


@pytest.mark.parametrize("per_matrix", [False, True])
def test_population_fitness_equals_each_mix_alone(setup, per_matrix):
    params, svd, experts, _, _, arrays = setup
    dim = sum(k for _, k in A.alpha_layout(experts[0], 3, per_matrix))
    alphas = np.random.default_rng(0).random((4, dim)).astype(np.float32)
    alphas[0] = np.tile([0.0, 1.0, 0.0], dim // 3)  # one-hot: expert 1 itself
    accuracy, tie = A.option_fitness(jnp.asarray(alphas), params, svd, experts, arrays, model_config=CONFIG,
                                     form="released", per_matrix=per_matrix)
    for p in range(4):
        z = t2_jax.mix_experts(experts, A.alpha_tree(jnp.asarray(alphas[p]), experts, per_matrix), "released")
        direct = _direct(params, svd, z, t2_jax.z_form("released"), arrays)
        assert float(accuracy[p]) == pytest.approx(direct[0]) and float(tie[p]) == pytest.approx(direct[1], rel=1e-5)
    expert_itself = _direct(params, svd, experts[1], "released", arrays)  # released form: logits -> sigmoid
    assert float(accuracy[0]) == pytest.approx(expert_itself[0])
    assert float(tie[0]) == pytest.approx(expert_itself[1], rel=1e-5, abs=1e-5)


def test_few_shot_cem_end_to_end(setup):
    params, svd, experts, examples, tokenizer, arrays = setup
    result = A.few_shot_cem(params, CONFIG, svd, experts, examples, tokenizer,
                            config=A.CEMConfig(population=6, generations=3))
    assert result.alpha.shape == (3,) and np.all((0 <= result.alpha) & (result.alpha <= 1))
    z = t2_jax.mix_experts(experts, jnp.asarray(result.alpha, jnp.float32), "released")
    accuracy, tie = _direct(params, svd, z, t2_jax.z_form("released"), arrays)
    assert result.fitness[0] == pytest.approx(accuracy) and result.fitness[1] == pytest.approx(tie, rel=1e-5)
    assert len(result.history) == 3
    with pytest.raises(ValueError, match="at least one expert"):
        A.few_shot_cem(params, CONFIG, svd, [], examples, tokenizer)


# ---- the two passes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adaptive(setup):
    params, svd, experts, examples, tokenizer, _ = setup
    model = A.SelfAdaptiveModel(params, CONFIG, tokenizer, {"math": experts[0], "code": experts[1],
                                                            "science": experts[2]}, svd=svd, eval_batch=4)
    return model, examples


def _argmax_answers(weights, examples, tokenizer):
    scores = O.option_scores(weights, CONFIG, O.encode_choices(tokenizer, examples))
    return [int(i) for i in np.asarray(jnp.argmax(scores, -1))]


def test_other_is_the_base_bit_for_bit_and_one_expert_is_that_expert(adaptive, setup):
    model, examples = adaptive
    params, svd, experts, _, tokenizer, _ = setup
    assert model.weights_for(None) is params
    base = model.adapt_and_generate(examples, "base")
    assert base["answers"] == _argmax_answers(params, examples, tokenizer) and base["mixes"] == [None] * 8
    single = model.adapt_and_generate(examples, "expert", expert="code")
    assert single["mixes"] == [(0.0, 1.0, 0.0)] * 8
    direct = t2_jax.factorise(params, svd, experts[1], "released")
    assert single["answers"] == _argmax_answers(direct, examples, tokenizer)
    mixed = model.weights_for((0.0, 1.0, 0.0))
    np.testing.assert_array_equal(  # the one-hot mix's singular-value scales are the expert's own
        np.asarray(mixed["layers"]["mlp"]["up"]["kernel"]["scale"]),
        np.asarray(direct["layers"]["mlp"]["up"]["kernel"]["scale"]))
    assert model.weights_for((0.0, 1.0, 0.0)) is mixed  # cached per mix


def test_prompt_and_classifier_strategies(adaptive, setup):
    model, examples = adaptive
    params, svd, experts, _, tokenizer, _ = setup
    assert A.parse_category("It is \\boxed{Code}.", ["math", "code"]) == "code"
    assert A.parse_category("maybe science or math", ["math", "science"]) == "science"
    assert A.parse_category("mathematics", ["math"]) == A.OTHER  # whole words only
    for strategy, extra in (("prompt", {}), ("classifier", {})):
        if strategy == "classifier":
            model.classifier = experts[2]
        out = model.adapt_and_generate(examples, strategy, **extra)
        labels = out["decision"]["labels"]
        assert len(labels) == 8 and set(labels) <= set(model.names) | {A.OTHER}
        for label, mix in zip(labels, out["mixes"]):
            assert mix == (None if label == A.OTHER else model.one_hot(label))
        assert out["first_pass_s"] > 0 and out["second_pass_s"] > 0
    model.classifier = None
    with pytest.raises(ValueError, match="classification expert"):
        model.first_pass(examples, "classifier")


def test_classifier_data_never_touches_test_pools():
    tasks = {name: testing.synthetic_task("choice", n=40, seed=seed) for seed, name in enumerate(["a", "b"])}
    pools = {name: X.pools_for(X.ExpertConfig(task=name, train_size=20, validation_size=8, test_size=8,
                                              batch_size=4), examples) for name, examples in tasks.items()}
    train = A.classifier_examples(pools, "train")
    test_ids = {f"{name}/{e.id}" for name, p in pools.items() for e in p["test"]}
    assert len(train) == 40 and not {e.id for e in train} & test_ids
    assert {e.gold_choice for e in train} == {"a", "b"} and all(e.choices == ("a", "b") for e in train)
    with pytest.raises(ValueError, match="test pools"):
        A.classifier_examples(pools, "test")


def test_few_shot_strategy_uses_one_mix(adaptive):
    model, examples = adaptive
    out = model.adapt_and_generate(examples[:4], "few_shot", shots=examples[4:],
                                   cem_config=A.CEMConfig(population=4, generations=2))
    alpha = out["decision"]["alpha"]
    assert out["mixes"] == [alpha] * 4 and len(alpha) == 3
    assert out["answers"] == _argmax_answers(model.weights_for(alpha), examples[:4], model.tokenizer)


def test_bad_inputs(adaptive, setup, tmp_path):
    model, examples = adaptive
    params, svd, experts, _, tokenizer, _ = setup
    with pytest.raises(ValueError, match="unknown strategy"):
        model.adapt_and_generate(examples, "oracle")
    with pytest.raises(ValueError, match="expert=<name>"):
        model.first_pass(examples, "expert")
    with pytest.raises(ValueError, match="unknown expert"):
        model.first_pass(examples, "expert", expert="law")
    with pytest.raises(ValueError, match="needs shots"):
        model.first_pass(examples, "few_shot")
    with pytest.raises(ValueError, match="at least one expert"):
        A.SelfAdaptiveModel(params, CONFIG, tokenizer, {}, svd=svd)
    with pytest.raises(ValueError, match="reserved"):
        A.SelfAdaptiveModel(params, CONFIG, tokenizer, {"other": experts[0]}, svd=svd)
    with pytest.raises(ValueError, match="at least one example"):
        model.adapt_and_generate([], "base")
    other_base = testing.tiny_params(seed=9)
    path = t2_jax.save_expert(tmp_path / "e.safetensors", experts[0], base_fingerprint=t2_jax.fingerprint(other_base),
                              rule=t2_jax.DEFAULT_RULE, form="released")
    with pytest.raises(t2_jax.ExpertMismatchError):
        A.SelfAdaptiveModel.from_files(params, CONFIG, tokenizer, {"math": path})
    good = t2_jax.save_expert(tmp_path / "g.safetensors", experts[0], base_fingerprint=t2_jax.fingerprint(params),
                              rule=t2_jax.DEFAULT_RULE, form="released")
    loaded = A.SelfAdaptiveModel.from_files(params, CONFIG, tokenizer, {"math": good}, svd_cache=tmp_path)
    assert loaded.names == ("math",) and loaded.form == "released"


def test_cli_rejects_bad_arguments():
    from t2_jax import adapt as cli

    with pytest.raises(SystemExit, match="unknown strategy"):
        cli.main(["--task", "arc_challenge", "--strategy", "oracle", "--expert", "a=b"])
    with pytest.raises(SystemExit, match="NAME=PATH"):
        cli.main(["--task", "arc_challenge", "--strategy", "prompt", "--expert", "nopath"])
    with pytest.raises(SystemExit, match="at least one expert"):
        cli.main(["--task", "arc_challenge", "--strategy", "prompt"])


def test_adaptation_driver_quick(tmp_path):
    from experiments import t2_adaptation

    table = t2_adaptation.main(["--quick", "--out", str(tmp_path / "a"), "--no-progress"])
    entry = table["fam2"]
    assert set(entry) == {"base", "prompt", "classifier", "few_shot", "lora"}
    assert entry["lora"]["first_pass_s"] == 0.0 and entry["lora"]["decisions"][0]["adapter"].endswith(".safetensors")
    assert (tmp_path / "a" / "cem.png").stat().st_size > 0
    assert entry["base"]["difference_from_base"] == 0.0
    counts = entry["classifier"]["decisions"][0]["label_counts"]
    assert sum(counts.values()) == 8 and set(counts) <= {"fam0", "fam1", "other"}
    assert len(entry["few_shot"]["decisions"][0]["alpha"]) == 2
    assert (tmp_path / "a" / "table2.md").read_text().startswith("| task | strategy |")
