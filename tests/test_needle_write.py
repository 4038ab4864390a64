"""experiments.needle_write: the needle's write followed through the memory by four replays
(with / without the needle's writes, with / without the writes after it), against the same
replays computed independently: one whole-sequence call of the per-token reference memory on
the model's unstreamed inputs, with the step sizes zeroed where each replay says."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import needle_gates, needle_write
from experiments.gate_trace import memory_layers
from titans_jax import memory as memory_lib
from titans_jax import models

PERSISTENT = 3


def _model(**changes):
    config = models.ModelConfig(arch="lmm", vocab_size=256, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                                mlp_hidden=64, window=8, num_persistent=PERSISTENT, dtype="float64",
                                param_dtype="float64").replace(
        {"lmm.memory.chunk_size": 4, "lmm.theta_max": 0.5, **changes})
    model = models.TitansLM(config)
    return config, model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


# a prompt with a needle ("4711") and a question after its context; offsets are bytes
PROMPT = "Some haystack text. The magic number is 4711. More haystack here, and more. Question: what? "
EXAMPLE = types.SimpleNamespace(prompt=PROMPT, answer="4711", needle_chars=((20, 45),),
                                context_chars=(0, PROMPT.index("Question")))


def _reference_figures(config, model, params):
    """The figures from whole-sequence reference calls (from M_0, persistent tokens first)."""
    ids = np.frombuffer(PROMPT.encode(), np.uint8).astype(np.int32)
    start, end = needle_gates.needle_span(PROMPT, "4711", EXAMPLE.needle_chars[0])
    question = EXAMPLE.context_chars[1]
    diagnostics = model.apply({"params": params}, jnp.asarray(ids[None]), mutable=["diagnostics"])[1]["diagnostics"]
    memory_config = dataclasses.replace(config.memory_layer.resolve().memory_config, impl="reference")
    figures = {}
    for path, inputs in memory_layers(diagnostics):
        layer_params = params[path[0]][path[1]]["memory"]
        needle = slice(PERSISTENT + start, PERSISTENT + end)

        def weights(stop, needle_writes, later_writes, inputs=inputs, layer_params=layer_params, needle=needle):
            theta = inputs[3]
            if not needle_writes:
                theta = theta.at[..., needle].set(0.0)
            if not later_writes:
                theta = theta.at[..., PERSISTENT + end:].set(0.0)
            cut = [None if x is None else x[:, :, :PERSISTENT + stop] for x in inputs[:3] + (theta,) + inputs[4:]]
            return memory_lib.memory_apply(layer_params, *cut, memory_config)[1].weights

        at_end = {"A": weights(end, True, True), "B": weights(end, False, True)}
        at_question = {name: weights(question, *writes) for name, writes in
                       zip(needle_write.REPLAYS, [(True, True), (False, True), (True, False), (False, False)])}
        figures["/".join(path)] = needle_write.write_figures(layer_params, memory_config, at_end, at_question,
                                                             inputs[0][0, :, needle], inputs[1][0, :, needle])
        log_keep = inputs[5]
        figures["/".join(path)]["retention"] = 1.0 if log_keep is None else float(np.exp(np.mean(np.sum(
            np.asarray(log_keep[0, :, PERSISTENT + end:PERSISTENT + question], np.float64), axis=-1))))
    return figures


@pytest.mark.parametrize("changes", [{}, pytest.param({"lmm.use_momentum": False, "lmm.use_forgetting": False},
                                                    marks=pytest.mark.slow)],  # the same replays without the gate
                         ids=["lmm", "ttt"])
def test_streamed_replays_are_the_whole_sequence_reference_replays(changes):
    with jax.enable_x64(True):  # float64: the fits are small differences of losses
        config, model, params = _model(**changes)
        streamed = needle_write.example_figures(needle_gates.GateStream(model, params, window=8), config, EXAMPLE)
        reference = _reference_figures(config, model, params)
    assert list(streamed) == list(reference) == ["block_0/memory", "block_1/memory"]
    for path in streamed:
        assert streamed[path]["replay_gap"] < 1e-12  # the replay A ends at the model's own memory state
        assert {name: streamed[path][name] for name in reference[path]} == pytest.approx(
            reference[path], rel=1e-9, abs=1e-12), path
        assert 0 < streamed[path]["fit_end"] < 1  # the needle's write lowers its own pairs' loss
    if changes:  # no gate, no momentum: after the needle nothing but the later writes moves its write
        for figures in streamed.values():
            assert figures["retention"] == 1.0 and figures["gates"] == pytest.approx(1.0, rel=1e-12)
    else:
        assert all(figures["retention"] < 1.0 for figures in streamed.values())


def test_a_story_s_needle_is_the_answer_s_last_mention():
    story = "Mary went to the office. Some text. John went to the office. More haystack. Question: where? "
    sentences = ((0, 24), (36, 60))
    assert [story[a:b] for a, b in sentences] == ["Mary went to the office.", "John went to the office."]
    both = types.SimpleNamespace(task="qa1", seed=0, prompt=story, answer="office", needle_chars=sentences,
                                 context_chars=(0, story.index("Question")))
    last = types.SimpleNamespace(**{**vars(both), "needle_chars": sentences[1:]})
    with jax.enable_x64(True):
        config, model, params = _model()
        stream = needle_gates.GateStream(model, params, window=8)
        figures = [needle_write.example_figures(stream, config, example) for example in (both, last)]
    assert figures[0] == figures[1]


def test_a_needle_without_a_question_after_it_is_refused():
    late = types.SimpleNamespace(**{**vars(EXAMPLE), "context_chars": (0, 30)})  # the question inside the needle
    with jax.enable_x64(True):
        config, model, params = _model()
        with pytest.raises(ValueError, match="expected the needle, then the question"):
            needle_write.example_figures(needle_gates.GateStream(model, params, window=8), config, late)


@pytest.mark.slow  # ~15 s; the contract itself is test_streaming's, this is the stream_drift tool on it
def test_stream_drift_is_zero_in_float64_whatever_the_window():
    """Streaming's contract: any split of a prompt gives the same memory (float64: to rounding)."""
    from experiments import stream_drift

    ids = np.frombuffer(PROMPT.encode(), np.uint8).astype(np.int32)
    with jax.enable_x64(True):
        config, model, params = _model()
        rows = stream_drift.drift(model, params, ids, (8, 16), every=32)
    assert [stop for stop, _ in rows] == [32, 64, ids.size]
    assert all(len(gaps) == 2 and max(gaps) < 1e-12 for _, gaps in rows)


def test_a_write_the_gates_erase_has_no_later_writes_factor():
    """Where the gates' product underflows (C = D at the question) the factors against it are
    undefined (None in the rows, valid JSON), not a division error; the rest is still reported."""
    config = memory_lib.MemoryConfig(key_dim=4, value_dim=4, depth=1).resolve()
    base = memory_lib.init_memory_params(jax.random.key(0), config, num_heads=2)
    weights = lambda scale: ({"w": scale * base["layers"][0]["w"][None]},)  # noqa: E731  [1, H, I, O]
    keys = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 4)))
    figures = needle_write.write_figures(base, config, {"A": weights(1.5), "B": weights(1.0)},
                                         {"A": weights(1.5), "B": weights(1.0), "C": weights(0.0), "D": weights(0.0)},
                                         keys, keys)
    assert figures["gates"] == 0.0 and figures["kept"] == pytest.approx(1.0)
    assert figures["later_writes"] is None and figures["read"] is None
    row = {"length": 1024, "layers": {"block_0/memory": {**figures, "retention": 0.0, "replay_gap": 0.0}}}
    table = needle_write.report([row, {**row, "layers": {"block_0/memory": {**row["layers"]["block_0/memory"],
                                                                           "read": 0.5}}}])
    assert "| undefined |" in table and "0.5 [0.5, 0.5] (1 of 2)" in table


# capped: the cap binds on most tokens, not all, so both sides of min(|u|, cap) are checked by default
@pytest.mark.parametrize("clip", [pytest.param(None, marks=pytest.mark.slow), 2.0], ids=["uncapped", "capped"])
def test_stream_norms_are_the_whole_sequence_figures(clip):
    """stream_drift.norms (windows of 8, the prompt starting 3 tokens into a chunk of 4 after the
    persistent prefix) against one whole-sequence call's memory inputs: |u| and |W| per token
    from M_0 (gate_trace.surprise_norms), the weights' norm from the memory run to each mark; with
    a surprise cap the step takes min(|u|, cap)."""
    from experiments import stream_drift
    from experiments.gate_trace import inner_figures, surprise_norms

    ids = np.frombuffer(PROMPT.encode(), np.uint8).astype(np.int32)
    with jax.enable_x64(True):
        config, model, params = _model(**({} if clip is None else {"lmm.memory.surprise_clip": clip}))
        memory_config = config.memory_layer.resolve().memory_config
        rows = stream_drift.norms(model, params, memory_config, ids, window=8, every=32)
        diagnostics = model.apply({"params": params}, jnp.asarray(ids[None]), mutable=["diagnostics"])[1]["diagnostics"]
        assert [stop for stop, _ in rows] == [0, 32, 64, ids.size]
        for index, (path, inputs) in enumerate(memory_layers(diagnostics)):
            layer_params = params[path[0]][path[1]]["memory"]
            surprise, scale = (x[0, :, PERSISTENT:] for x in surprise_norms(layer_params, inputs, memory_config,
                                                                           weight_norms=True))
            theta = np.asarray(inputs[3][0, :, PERSISTENT:])
            if clip is not None:  # the cap binds on most tokens (so on the medians), not all
                assert 0.5 < np.mean(surprise > clip) < 1
            step = theta * (surprise if clip is None else np.minimum(surprise, clip)) / scale
            figures = {name: x[0, :, PERSISTENT:]
                       for name, x in inner_figures(layer_params, inputs, memory_config).items()}
            layer_steps = (theta * (1 if clip is None else np.minimum(1, clip / surprise)))[..., None] * (
                figures["surprise"] / figures["weights"])  # [H, T, L]
            for (stop, layers), start in zip(rows, [None, 0, 32, 64]):
                _, state = memory_lib.memory_apply(layer_params, *(None if x is None else x[:, :, :PERSISTENT + stop]
                                                                   for x in inputs), memory_config)
                weights = np.mean(np.sqrt(sum(np.sum(np.square(np.asarray(leaf[0])).reshape(2, -1), axis=1)
                                              for leaf in jax.tree.leaves(state.weights))))
                layer_weights = [np.mean(np.sqrt(sum(np.sum(np.square(np.asarray(leaf[0])).reshape(2, -1), axis=1)
                                                     for leaf in layer.values()))) for layer in state.weights]
                assert layers[index]["layer_weights"] == pytest.approx(layer_weights, rel=1e-12)
                if start is None:  # before the prompt: the state after the persistent tokens
                    assert layers[index]["theta"] is layers[index]["surprise"] is layers[index]["step"] is None
                    assert layers[index]["layer_steps"] is layers[index]["norm_input"] is None
                    assert layers[index]["weights"] == pytest.approx(weights, rel=1e-12)
                    continue
                mine = dict(layers[index])
                medians = list(np.median(layer_steps[:, start:stop], axis=(0, 1)))
                assert mine.pop("layer_steps") == pytest.approx(medians, rel=1e-6), (path, stop)
                assert mine.pop("layer_weights") == pytest.approx(layer_weights, rel=1e-12)
                assert mine == pytest.approx({"weights": weights, "theta": np.median(theta[:, start:stop]),
                                              "surprise": np.median(surprise[:, start:stop]),
                                              "step": np.median(step[:, start:stop]),
                                              "norm_input": np.median(figures["norm_input"][:, start:stop])},
                                             rel=1e-6), (path, stop)
