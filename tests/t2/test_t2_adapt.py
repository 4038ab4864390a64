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
