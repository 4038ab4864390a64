"""SVF on a Titans model (t2_jax.titans): the rules select the intended matrices, a uniform expert
reproduces the model, an expert trained by next-token prediction lowers the loss on its data and
resumes exactly, and the two-pass per-window choice equals a direct computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import testing
from t2_jax import titans as T
from titans_jax.models import ModelConfig, TitansLM

CONFIG = ModelConfig().replace(dict(arch="mac", vocab_size=32, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                                    mlp_hidden=48, window=8, segment_size=8, num_persistent=2,
                                    **{"lmm.memory.chunk_size": 4}))


@pytest.fixture(scope="module")
def titans():
    model = TitansLM(CONFIG)
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, CONFIG.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"]
    return model, params


def _windows(step, pattern):
    """Windows of a repeating pattern (learnable), shifted per step."""
    rng = np.random.default_rng(step)
    starts = rng.integers(0, len(pattern), 4)
    return np.stack([np.resize(np.roll(pattern, -s), 17) for s in starts]).astype(np.int32)


def test_rules_select_the_intended_matrices(titans):
    _, params = titans
    mlp = t2_jax.select_paths(params, T.RULES["mlp"])
    assert mlp and all("/mlp/" in p for p in mlp) and len(mlp) == 2 * 3
    memory = t2_jax.select_paths(params, T.RULES["memory"])
    assert memory and all("memory/" in p and p.endswith(("qkv/kernel", "out/kernel")) for p in memory)
    projections = t2_jax.select_paths(params, T.RULES["projections"])
    assert set(mlp) | set(memory) <= set(projections)
    with pytest.raises(ValueError, match="rule"):
        T.TitansExpertConfig(name="x", rule="everything")


def test_uniform_expert_reproduces_the_model(titans):
    model, params = titans
    svd = t2_jax.compute_svd(params, T.RULES["projections"])
    expert = t2_jax.init_expert(svd, "released")  # uniform logits: W' = W (nuclear norm kept)
    tokens = jnp.asarray(_windows(0, np.arange(5)))
    base = T.nll_per_target(model, params, tokens)
    adapted = T.nll_per_target(model, t2_jax.compose(params, svd, expert, "released"), tokens)
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(base), rtol=1e-4, atol=1e-4)


def test_expert_training_lowers_its_loss_and_resumes(tmp_path, titans):
    model, params = titans
    svd = t2_jax.compute_svd(params, T.RULES["mlp"])
    pattern = np.asarray([3, 1, 4, 1, 5, 9, 2, 6])
    config = T.TitansExpertConfig(name="pattern", steps=6, learning_rate=0.05)
    batch = lambda i: _windows(i, pattern)  # noqa: E731
    summary = T.train_titans_expert(config, CONFIG, params, svd, batch, tmp_path / "a")
    assert summary["completed"]
    expert, meta = t2_jax.load_expert(tmp_path / "a" / "expert.safetensors", params=params)
    assert meta["name"] == "pattern" and meta["rule"] == T.RULES["mlp"]
    tokens = jnp.asarray(_windows(100, pattern))
    before = float(jnp.mean(T.nll_per_target(model, params, tokens)))
    after = float(jnp.mean(T.nll_per_target(model, t2_jax.compose(params, svd, expert, "released"), tokens)))
    assert after < before - 0.01
    # a run interrupted at step 4 (its checkpoint is step 3) resumes to the same expert

    def crashing(i):
        if i == 4:
            raise RuntimeError("interrupted")
        return batch(i)

    with pytest.raises(RuntimeError, match="interrupted"):
        T.train_titans_expert(config, CONFIG, params, svd, crashing, tmp_path / "b")
    resumed = T.train_titans_expert(config, CONFIG, params, svd, batch, tmp_path / "b")
    assert resumed["resumed_from"] == 3 and resumed["completed"]
    again, _ = t2_jax.load_expert(tmp_path / "b" / "expert.safetensors", params=params)
    testing.assert_trees_close(again, expert)


def test_per_window_choice_matches_a_direct_computation(titans):
    model, params = titans
    svd = t2_jax.compute_svd(params, T.RULES["mlp"])
    other = t2_jax.compose(params, svd, t2_jax.init_expert(svd, "paper", jax.random.key(3), noise_std=0.5), "paper")
    tokens = np.concatenate([_windows(1, np.arange(6)), _windows(2, np.asarray([7, 7, 2]))])
    mask = np.ones((8, 16), bool)
    mask[-1, 12:] = False  # a padded last window
    lengths = np.arange(1, CONFIG.vocab_size + 1)  # distinct byte lengths per id
    out = T.per_window_choice(model, {"base": params, "other": other}, [(tokens, mask)], prefix=6,
                              byte_lengths=lengths)
    nll = {n: np.asarray(T.nll_per_target(model, p, jnp.asarray(tokens))) for n, p in
           (("base", params), ("other", other))}
    rest = mask.copy()
    rest[:, :6] = False
    first = mask & ~rest
    pick = [min(nll, key=lambda n: (nll[n][b] * first[b]).sum()) for b in range(8)]
    units = (lengths[tokens[:, 1:]] * rest).sum() * np.log(2)
    adaptive = sum((nll[pick[b]][b] * rest[b]).sum() for b in range(8)) / units
    assert out["bits"]["adaptive"] == pytest.approx(adaptive, rel=1e-5)
    assert out["bits"]["base"] == pytest.approx((nll["base"] * rest).sum() / units, rel=1e-5)
    assert out["bits"]["oracle"] <= min(out["bits"]["base"], out["bits"]["other"]) + 1e-9
    assert out["chosen"]["base"] + out["chosen"]["other"] == 8
    with pytest.raises(ValueError, match="leaves no target"):
        T.per_window_choice(model, {"base": params}, [(tokens, mask)], prefix=16)
