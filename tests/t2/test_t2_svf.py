"""SVF: SVD caching, the paper's and the released composition, factorised application, mixing,
gradients, and expert save/load with base-model fingerprints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import testing

CONFIG = t2_jax.get_config("tiny")
MIXED_RULE = r"layers/(mlp/(gate|up|down)|attn/(q|v))/kernel"


@pytest.fixture(scope="module")
def params():
    return testing.tiny_params(CONFIG, seed=3)


@pytest.fixture(scope="module")
def svd(params):
    return t2_jax.compute_svd(params)


def random_expert(svd, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return t2_jax.unflatten_paths({p: jnp.asarray(1.0 + scale * rng.standard_normal(f.s.shape),
                                                  jnp.float32) for p, f in svd.items()})


def test_default_rule_selects_mlp_matrices_of_every_layer(params, svd):
    assert sorted(svd) == ["layers/mlp/down/kernel", "layers/mlp/gate/kernel",
                           "layers/mlp/up/kernel"]
    f = svd["layers/mlp/down/kernel"]
    L, F, D = CONFIG.num_layers, CONFIG.intermediate_size, CONFIG.hidden_size
    assert f.u.shape == (L, F, D) and f.s.shape == (L, D) and f.vt.shape == (L, D, D)
    assert t2_jax.select_paths(params, MIXED_RULE) == [
        "layers/attn/q/kernel", "layers/attn/v/kernel", "layers/mlp/down/kernel",
        "layers/mlp/gate/kernel", "layers/mlp/up/kernel"]
    with pytest.raises(ValueError, match="selects no matrix"):
        t2_jax.select_paths(params, r"layers/nothing")


@pytest.mark.parametrize("form,value", [("paper", 1.0), ("released", 0.3), ("released", -2.0),
                                        ("released_z", 0.7)])
def test_uniform_z_reproduces_base_weights(params, svd, form, value):
    expert = jax.tree.map(lambda z: jnp.full_like(z, value), t2_jax.init_expert(svd, form))
    adapted = t2_jax.compose(params, svd, expert, form)
    testing.assert_trees_close(adapted, params, atol=2e-6)


def test_paper_form_without_rescale_changes_weights(params, svd):
    expert = jax.tree.map(lambda z: jnp.full_like(z, 0.5), t2_jax.init_expert(svd, "paper"))
    adapted = t2_jax.flatten_paths(t2_jax.compose(params, svd, expert, "paper"))
    np.testing.assert_allclose(adapted["layers/mlp/up/kernel"],
                               0.5 * params["layers"]["mlp"]["up"]["kernel"], atol=2e-6)


@pytest.mark.parametrize("form", ["paper", "released"])
def test_factorised_equals_composed(params, svd, form):
    expert = random_expert(svd, seed=1)
    tokens = testing.random_tokens(2, 9, CONFIG.vocab_size, seed=1)
    composed, _ = t2_jax.apply(t2_jax.compose(params, svd, expert, form), CONFIG, tokens)
    factorised, _ = t2_jax.apply(t2_jax.factorise(params, svd, expert, form), CONFIG, tokens)
    base, _ = t2_jax.apply(params, CONFIG, tokens)
    np.testing.assert_allclose(factorised, composed, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(composed) - np.asarray(base)).max() > 1e-2  # the expert matters


def test_released_form_matches_its_formula(params, svd):
    expert = random_expert(svd, seed=2)
    path = "layers/mlp/gate/kernel"
    f = svd[path]
    z = jax.nn.sigmoid(t2_jax.flatten_paths(expert)[path][0])
    want = (np.asarray(f.u[0]) @ np.diag(np.asarray(f.s[0] * z)) @ np.asarray(f.vt[0])
            * float(f.s[0].sum() / (f.s[0] * z).sum()))
    got = t2_jax.flatten_paths(t2_jax.compose(params, svd, expert, "released"))[path][0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("form", ["paper", "released"])
def test_one_hot_alpha_reproduces_that_expert(params, svd, form):
    experts = [random_expert(svd, seed=s) for s in (10, 11, 12)]
    mixed = t2_jax.mix_experts(experts, jnp.array([0.0, 1.0, 0.0]), form)
    want = t2_jax.compose(params, svd, experts[1], form)
    got = t2_jax.compose(params, svd, mixed, t2_jax.z_form(form))
    for path in svd:
        np.testing.assert_allclose(t2_jax.flatten_paths(got)[path],
                                   t2_jax.flatten_paths(want)[path], atol=1e-6)


def test_mixing_per_expert_and_per_matrix(svd):
    experts = [random_expert(svd, seed=s) for s in (20, 21)]
    flat = [t2_jax.flatten_paths(e) for e in experts]
    mixed = t2_jax.flatten_paths(t2_jax.mix_experts(experts, [0.25, 0.5]))
    for path in svd:
        np.testing.assert_allclose(mixed[path], 0.25 * flat[0][path] + 0.5 * flat[1][path],
                                   atol=1e-6)
    # per expert per matrix (K,), and per expert per matrix per layer (K, L)
    alpha = t2_jax.unflatten_paths({p: jnp.array([1.0, 0.0]) if "gate" in p else
                                    jnp.array([[0.0, 1.0], [1.0, 0.0]]).T for p in svd})
    mixed = t2_jax.flatten_paths(t2_jax.mix_experts(experts, alpha))
    np.testing.assert_allclose(mixed["layers/mlp/gate/kernel"], flat[0]["layers/mlp/gate/kernel"])
    np.testing.assert_allclose(mixed["layers/mlp/up/kernel"][0], flat[1]["layers/mlp/up/kernel"][0])
    np.testing.assert_allclose(mixed["layers/mlp/up/kernel"][1], flat[0]["layers/mlp/up/kernel"][1])
    with pytest.raises(ValueError, match="alpha must have shape"):
        t2_jax.mix_experts(experts, [1.0, 0.0, 0.0])


@pytest.mark.parametrize("apply_form", [t2_jax.compose, t2_jax.factorise])
def test_gradients_flow_to_z_only(params, svd, apply_form):
    expert = t2_jax.init_expert(svd, "released", key=jax.random.key(0))
    tokens = testing.random_tokens(1, 6, CONFIG.vocab_size, seed=3)

    def loss(params, svd, expert):
        adapted = apply_form(params, svd, expert, "released")
        return t2_jax.continuation_logprobs(adapted, CONFIG, tokens[:, :3], None,
                                            tokens[:, 3:]).sum()

    g_params, g_svd, g_expert = jax.grad(loss, argnums=(0, 1, 2))(params, svd, expert)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves((g_params, g_svd)))
    expert_grads = jax.tree.leaves(g_expert)
    assert len(expert_grads) == 3
    assert all(np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0
               for g in expert_grads)


def test_svd_cache_round_trip_keyed_by_fingerprint(params, tmp_path):
    first = t2_jax.svd_cached(params, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith(t2_jax.fingerprint(params)[:16])
    again = t2_jax.svd_cached(params, cache_dir=tmp_path)
    testing.assert_trees_close(again, first)
    other = jax.tree.map(lambda x: x * 1.01, params)
    assert t2_jax.fingerprint(other) != t2_jax.fingerprint(params)
    t2_jax.svd_cached(other, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_expert_save_load_and_wrong_base_refused(params, svd, tmp_path):
    expert = random_expert(svd, seed=4)
    fp = t2_jax.fingerprint(params)
    file = t2_jax.save_expert(tmp_path / "math.safetensors", expert, base_fingerprint=fp,
                              rule=t2_jax.DEFAULT_RULE, form="released", extra={"task": "math"})
    loaded, meta = t2_jax.load_expert(file, base_fingerprint=fp, svd=svd)
    assert meta["form"] == "released" and meta["rule"] == t2_jax.DEFAULT_RULE
    assert meta["task"] == "math" and meta["base_fingerprint"] == fp
    testing.assert_trees_close(loaded, expert)
    other_fp = t2_jax.fingerprint(testing.tiny_params(CONFIG, seed=99))
    with pytest.raises(t2_jax.ExpertMismatchError, match="wrong model"):
        t2_jax.load_expert(file, base_fingerprint=other_fp)
    with pytest.raises(t2_jax.ExpertMismatchError, match="different selection rules"):
        t2_jax.load_expert(file, fp, svd=t2_jax.compute_svd(params, MIXED_RULE))


def test_expert_base_is_checked_by_default(params, svd, tmp_path):
    # the file records its base: loading without naming the target model is refused too
    fp = t2_jax.fingerprint(params)
    file = t2_jax.save_expert(tmp_path / "e.safetensors", random_expert(svd, seed=5),
                              base_fingerprint=fp, rule=t2_jax.DEFAULT_RULE, form="paper")
    with pytest.raises(ValueError, match=r"trained on base model [0-9a-f]{16}…; name the model"):
        t2_jax.load_expert(file)
    with pytest.raises(ValueError, match="trained on base model"):
        t2_jax.load_expert(file, svd=svd)
    other = testing.tiny_params(CONFIG, seed=98)
    with pytest.raises(t2_jax.ExpertMismatchError, match="allow_other_base=True to override"):
        t2_jax.load_expert(file, params=other)
    expert, _ = t2_jax.load_expert(file, params=params)  # the right base, given as params
    testing.assert_trees_close(expert, random_expert(svd, seed=5))
    for kwargs in (dict(params=other), {}):
        with pytest.warns(UserWarning, match="allow_other_base=True"):
            t2_jax.load_expert(file, allow_other_base=True, **kwargs)
