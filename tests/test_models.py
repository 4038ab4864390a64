"""The language models: causality, gradients reach every parameter, presets, generation and
clear errors (streaming == parallel is tests/test_streaming.py). Tiny shapes; float64 where
outputs are compared."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titans_jax import decoding as gen
from titans_jax.models import ModelConfig, TitansLM, abstract_params, param_count
from titans_jax.presets import MLP_MULTIPLE, PRESETS, preset

from tiny_lm import ARCHS, LENGTH, TINY, model_getter, tiny_config
from tiny_lm import arch_params as _arch_params

SLOW = {"mac_learned", "mac_block_input", "ttt", "linear", "mal"}  # code paths of mac / lmm / mag with other settings


def arch_params(names):
    return _arch_params(names, SLOW)


@pytest.fixture(scope="module")
def tiny_models():
    with jax.enable_x64(True):
        yield model_getter()


@pytest.mark.parametrize("name", arch_params(ARCHS))
def test_causality_changing_a_token_never_changes_earlier_logits(tiny_models, name):
    with jax.enable_x64(True):
        tiny = tiny_models(name)
        for position in (5, 13):  # inside the first segment / the second segment, mid-chunk
            changed = tiny.tokens.at[:, position].set((tiny.tokens[:, position] + 7) % tiny.config.vocab_size)
            a, b = tiny.forward(tiny.params, tiny.tokens), tiny.forward(tiny.params, changed)
            np.testing.assert_allclose(a[:, :position], b[:, :position], rtol=0, atol=1e-13)
            assert float(jnp.max(jnp.abs(a[:, position] - b[:, position]))) > 1e-6


@pytest.mark.parametrize("name", arch_params(ARCHS))
def test_gradients_are_finite_and_reach_every_parameter(tiny_models, name):
    with jax.enable_x64(True):
        tiny = tiny_models(name)

        def loss(params):
            logits = tiny.model.apply({"params": params}, tiny.tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tiny.tokens[:, 1:, None], axis=-1))

        grads = jax.jit(jax.grad(loss))(tiny.params)
        flat = jax.tree_util.tree_flatten_with_path(grads)[0]
        for path, leaf in flat:
            name_ = jax.tree_util.keystr(path)
            assert bool(jnp.all(jnp.isfinite(leaf))), name_
            assert float(jnp.max(jnp.abs(leaf))) > 0, f"no gradient reaches {name_}"


def test_mac_needs_segment_weights_from_the_previous_segment(tiny_models):
    """The pre-segment retrieval really reads the memory written by the previous segment: a change
    in segment 1 reaches segment 2's logits through the memory (MAC attends only inside a segment)."""
    with jax.enable_x64(True):
        tiny = tiny_models("mac")
        changed = tiny.tokens.at[:, 2].set((tiny.tokens[:, 2] + 1) % tiny.config.vocab_size)
        a, b = tiny.forward(tiny.params, tiny.tokens), tiny.forward(tiny.params, changed)
        assert float(jnp.max(jnp.abs(a[:, 8:] - b[:, 8:]))) > 1e-8  # segment 2 sees it (only via memory)


def test_generate_greedy_agrees_with_parallel_pass_and_sampling_is_reproducible(tiny_models):
    with jax.enable_x64(True):
        tiny = tiny_models("mag")
        prompt = tiny.tokens[:, :5]
        new, step_logits = gen.generate(tiny.model, tiny.params, prompt, 9)
        assert new.shape == (2, 9) and step_logits.shape == (2, 9, tiny.config.vocab_size)
        full = tiny.forward(tiny.params, jnp.concatenate([prompt, new], axis=1))
        np.testing.assert_array_equal(new, jnp.argmax(full[:, 4:13], axis=-1))
        np.testing.assert_allclose(step_logits, full[:, 5:14], rtol=1e-10, atol=1e-10)
        rng = jax.random.PRNGKey(11)
        sample_a, _ = gen.generate(tiny.model, tiny.params, prompt, 6, rng=rng, temperature=0.8, top_k=5)
        sample_b, _ = gen.generate(tiny.model, tiny.params, prompt, 6, rng=rng, temperature=0.8, top_k=5)
        np.testing.assert_array_equal(sample_a, sample_b)
        assert int(sample_a.min()) >= 0 and int(sample_a.max()) < tiny.config.vocab_size


# ----------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("arch", ["mac"] + [pytest.param(a, marks=pytest.mark.slow)
                                            for a in ("transformer", "swa", "lmm", "mag", "mal", "ttt", "linear")])
def test_tiny_and_small_presets_build_and_small_matches_its_size(arch):
    config = preset("tiny", arch)
    params = jax.jit(TitansLM(config).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert param_count(params) == param_count(abstract_params(config))
    assert_matches_target("small", arch)


def assert_matches_target(name: str, arch: str):
    """The count is the closest to the target that an MLP width in steps of MLP_MULTIPLE allows."""
    config = preset(name, arch)
    count = param_count(abstract_params(config))
    step = 3 * config.d_model * config.num_layers * MLP_MULTIPLE
    assert abs(count - PRESETS[name][1]) <= step / 2, (name, arch, count, config.num_layers, config.mlp_hidden)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "170M" else n
                                  for n in ("170M", "340M", "400M", "760M")])
@pytest.mark.parametrize("arch", ["transformer", "mac"])
def test_paper_presets_match_their_size_through_eval_shape(name, arch):
    assert_matches_target(name, arch)


# ----------------------------------------------------------------------------------------------
# Clear errors


def test_mac_write_block_input_changes_what_the_memory_writes_not_the_parameters(tiny_models):
    """mac_write="block_input" (an option beside the paper's write of y): the same parameters,
    other logits (the memory stores x, so everything after the first memory read moves)."""
    with jax.enable_x64(True):
        paper, other = tiny_models("mac"), tiny_models("mac_block_input")
        assert jax.tree.structure(paper.params) == jax.tree.structure(other.params)
        a, b = paper.forward(paper.params, paper.tokens), other.forward(paper.params, paper.tokens)
        assert float(jnp.max(jnp.abs(a - b))) > 1e-6


def test_transformer_is_swa_with_a_window_that_spans_the_sequence(tiny_models):
    """The Transformer++ control differs from SWA by the attention mask alone: the same parameters,
    and with a window as long as the sequence the same logits."""
    with jax.enable_x64(True):
        full, swa = tiny_models("transformer"), tiny_models("swa")
        assert jax.tree.structure(full.params) == jax.tree.structure(swa.params)
        spanning = TitansLM(tiny_config("swa", window=LENGTH))
        logits = full.forward(full.params, full.tokens)
        np.testing.assert_allclose(spanning.apply({"params": full.params}, full.tokens), logits, rtol=0, atol=1e-12)
        windowed = swa.forward(full.params, full.tokens)  # the tiny window (6) changes every later position
        assert float(jnp.max(jnp.abs(windowed[:, TINY["window"] + 1:] - logits[:, TINY["window"] + 1:]))) > 1e-6


def test_bad_configs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="multiple of the memory chunk size"):
        tiny_config("mac", segment_size=6)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        tiny_config("swa", window=0)
    with pytest.raises(ValueError, match="unknown arch"):
        ModelConfig(arch="mamba")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("1B", "mac")
    with pytest.raises(ValueError, match="unknown remat policy"):
        tiny_config("lmm", remat="everything")
    with pytest.raises(ValueError, match="cannot keep the persistent prefix"):
        tiny_config("mag", attention_impl="jax")
    with pytest.raises(ValueError, match="unknown mac_retrieval"):
        tiny_config("mac", mac_retrieval="leaky")
    with pytest.raises(ValueError, match="unknown mac_write"):
        tiny_config("mac", mac_write="residual")


def test_bad_inputs_are_rejected_with_clear_errors(tiny_models):
    with jax.enable_x64(True):
        tiny = tiny_models("swa")
        apply = lambda tokens, **kw: tiny.model.apply({"params": tiny.params}, tokens, **kw)  # noqa: E731
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
            apply(jnp.array([[1, 2, 50]]))
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\)"):
            apply(jnp.array([[1, -1]]))
        with pytest.raises(ValueError, match="shape \\[batch, length\\]"):
            apply(jnp.array([1, 2, 3]))
        with pytest.raises(TypeError, match="integer ids"):
            apply(jnp.ones((1, 3)))
        with pytest.raises(ValueError, match="at least one position"):
            apply(jnp.zeros((1, 0), jnp.int32))
        with pytest.raises(TypeError, match="mode"):  # the mode strings are gone: one call shape
            apply(jnp.array([[1]]), mode="decode")
        # under jit an out-of-range id cannot raise: the sequence's logits become NaN instead of
        # reading a clipped embedding row
        logits = tiny.forward(tiny.params, jnp.array([[1, 2, 99, 3]]))
        assert bool(jnp.all(jnp.isnan(logits[:, 2:])))


@pytest.mark.parametrize("name", ["swa", pytest.param("mac", marks=pytest.mark.slow)])
def test_remat_policies_give_the_same_gradients(name):
    """Block policies, and for MAC the per-segment remat against none at all."""
    with jax.enable_x64(True):
        base = tiny_config(name, num_layers=1, mac_remat_segments=False)
        tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 12), 0, base.vocab_size)
        params = jax.jit(TitansLM(base).init)(jax.random.PRNGKey(0), tokens)["params"]
        grads = {}
        policies = ("none", "full") if name == "mac" else ("none", "full", "dots_no_batch")
        for policy in policies:
            model = TitansLM(dataclasses.replace(base, remat=policy, mac_remat_segments=policy != "none"))
            grads[policy] = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, tokens)))))(params)
        for policy in policies[1:]:
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), grads[policy], grads["none"])


def test_bad_batches_and_generation_arguments_give_clear_errors(tiny_models):
    """Each of these crashed deep inside a layer (or ran on) before: an empty batch, a float
    max_new_tokens (caches of another batch, architecture or config: tests/test_streaming.py)."""
    with jax.enable_x64(True):
        mac = tiny_models("mac")
        with pytest.raises(ValueError, match="at least one sequence"):
            mac.model.apply({"params": mac.params}, jnp.zeros((0, 3), jnp.int32))
        for bad in (2.5, "3", True, 0):
            with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
                gen.generate(mac.model, mac.params, mac.tokens[:, :4], bad)


def test_memory_configs_of_the_model_reach_its_layers():
    """norm_eps, impl, the memory bias, loss_scale and the q/k l2-norm set on a model config
    reach the memory (they could not be set, or did not arrive, before): the built layer's
    parameters and outputs follow them."""
    with jax.enable_x64(True):
        base = tiny_config("lmm", num_layers=1)
        tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 9), 0, base.vocab_size)
        params = jax.jit(TitansLM(base).init)(jax.random.PRNGKey(0), tokens)["params"]
        reference = TitansLM(base.replace({"lmm.memory.impl": "reference"}))
        assert reference.config.memory_layer.memory_config.impl == "reference"
        np.testing.assert_allclose(reference.apply({"params": params}, tokens),
                                   TitansLM(base).apply({"params": params}, tokens), rtol=1e-10, atol=1e-12)
        with_bias = base.replace({"lmm.memory.use_bias": True})
        bias_params = jax.jit(TitansLM(with_bias).init)(jax.random.PRNGKey(0), tokens)["params"]
        assert "b" in bias_params["block_0"]["memory"]["memory"]["layers"][0]
        outputs = {}
        for name, change in {"base": {}, "norm_eps": {"norm_eps": 0.5}, "loss_scale": {"lmm.memory.loss_scale": 2.0},
                             "qk_l2_norm": {"lmm.qk_l2_norm": False}}.items():
            outputs[name] = TitansLM(base.replace(change)).apply({"params": params}, tokens)
        for name in ("norm_eps", "loss_scale", "qk_l2_norm"):
            assert float(jnp.max(jnp.abs(outputs[name] - outputs["base"]))) > 1e-6, name
