"""The benchmark scripts keep working in their quick modes (the memory benchmark was the README's first main command)."""

import pytest

from experiments import memory_bench


@pytest.mark.slow  # a benchmark's smoke run (48 s); the memory it times is tested in test_memory / test_lmm
def test_memory_bench_quick_mode_prints_its_tables(capsys, tmp_path):
    out_file = tmp_path / "bench.json"
    memory_bench.main(["--quick", "--no-peer", "--json", str(out_file)])
    printed = capsys.readouterr().out
    assert "float32 matmul rate" in printed
    assert "| ours, 1 device " in printed and "fwd tok/s" in printed and "f+b tok/s" in printed
    assert "scaling with sequence length" in printed
    import json

    result = json.loads(out_file.read_text())
    for name in ("fwd", "fwd+bwd"):
        assert result["ours"]["ours, 1 device"][name]["tokens_per_s"] > 0
        assert result["ours"]["ours, 1 device"][name]["flops"] > 0
    assert [row["tokens"] for row in result["scaling"]] == [128]


@pytest.mark.slow
def test_arch_bench_quick_mode_prints_its_tables(capsys, tmp_path):
    import json

    from experiments import arch_bench

    out_file = tmp_path / "a.json"
    arch_bench.main(["--quick", "--archs", "transformer,mac", "--json", str(out_file)])
    printed = capsys.readouterr().out
    assert "float32 matmul rate" in printed and f"jax {arch_bench.jax.__version__}" in printed
    assert "| arch " in printed and "| 64 fwd " in printed and "128 fwd+bwd |" in printed
    assert "peak memory of the compiled fwd+bwd" in printed
    assert "failed" not in printed
    result = json.loads(out_file.read_text())["results"]
    assert list(result) == ["transformer", "mac"]
    for arch in ("transformer", "mac"):
        assert result[arch]["params"] > 0
        assert list(result[arch]["lengths"]) == ["64", "128"]
        for cell in result[arch]["lengths"].values():
            for name in ("fwd", "fwd+bwd"):
                assert cell[name]["tokens_per_s"] > 0
                assert cell[name]["peak_bytes"] > 0


def test_first_nonfinite_names_the_operation_that_made_the_nan():
    import jax
    import jax.numpy as jnp

    from experiments import grad_spikes

    def loss(params, tokens, mask):
        shifted = params["w"] - 2.0
        return jnp.sum(jnp.sqrt(shifted) * mask)  # NaN from sqrt of a negative number

    where = grad_spikes.first_nonfinite(loss, {"w": jnp.ones(3)}, None, jnp.ones(3))
    assert where is not None and "jnp.sqrt(shifted)" in where
    assert grad_spikes.first_nonfinite(loss, {"w": jnp.full(3, 3.0)}, None, jnp.ones(3)) is None
    # checkify looks inside scans and names the operation too
    def scanned(params, tokens, mask):
        return jax.lax.scan(lambda carry, x: (carry + jnp.sqrt(x - 2.0), None), 0.0, params["w"] * mask)[0]

    found = grad_spikes.checkified_nan(scanned, {"w": jnp.ones(3)}, None, jnp.ones(3))
    assert found is not None and "sqrt" in found
    assert grad_spikes.checkified_nan(scanned, {"w": jnp.full(3, 3.0)}, None, jnp.ones(3)) is None


# the stable case in the slow tier (~20 s): the diverging one checks every figure finite up to where it is not
@pytest.mark.parametrize("theta_max", [pytest.param(0.001, marks=pytest.mark.slow), 3.0])
def test_blowup_position_and_memory_growth_find_where_a_memory_diverges(theta_max):
    """A tiny LMM without the residual norm: with a step of ~0.001 its memories stay finite, with
    ~3 their inner gradient descent diverges. The first non-finite token is where the logits
    (computed directly) first are, and the memory layers' weight norms end non-finite."""
    import jax
    import numpy as np

    from experiments import grad_spikes
    from titans_jax.models import TitansLM
    from titans_jax.presets import preset

    config = preset("tiny", "lmm", {"lmm.memory.residual_norm": False, "lmm.theta_max": theta_max,
                                    "lmm.theta_bias_init": 4.0})
    model = TitansLM(config)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 129), 0, config.vocab_size)
    params = model.init(jax.random.PRNGKey(1), tokens[:, :8])["params"]
    logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens[:, :-1]))[0]
    finite_logits = np.isfinite(logits).all(axis=-1)
    found = grad_spikes.blowup_position(model, params, tokens)
    first = min(position for _, position, _ in found)
    growth = grad_spikes.memory_growth(model, params, tokens[:, :-1], every=32)
    assert sorted(growth) == ["block_0/memory", "block_1/memory"] and all(len(n) == 4 for n in growth.values())
    with jax.enable_x64(True):  # float32 against float64 module by module, also where float32 is not finite
        model64 = TitansLM(config.replace({"dtype": "float64", "param_dtype": "float64"}))
        errors = dict(grad_spikes.precision_by_module(model, model64, params, tokens))
    if theta_max < 1:
        assert finite_logits.all() and first == 128
        assert all(np.isfinite(n).all() and (n > 0).all() for n in growth.values())
        assert all(np.isfinite(list(errors.values())))
    else:
        assert first == int(np.argmin(finite_logits)) < 128
        assert not np.isfinite(growth["block_0/memory"][-1])
        assert any(np.isinf(list(errors.values()))) and any(np.isfinite(list(errors.values())))


@pytest.mark.parametrize("floor", [False, True], ids=["plain", "last_layer_floor"])
def test_gate_trace_surprise_norms_are_the_tokens_gradients_at_their_chunk_start(floor):
    """gate_trace.surprise_norms and inner_figures against a loop: token t's inner gradient (all
    layers, and by layer) at the weights the memory held when t's chunk began, found by running
    the memory up to there; the MLP's output before the residual LayerNorm at those weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.gate_trace import inner_figures, surprise_norms
    from titans_jax import memory as mem
    from titans_jax.testing import random_memory_inputs, random_memory_params

    with jax.enable_x64(True):
        config = mem.MemoryConfig(key_dim=4, value_dim=4, depth=2, expansion=2, chunk_size=3, use_bias=True,
                                  last_layer_floor=floor)
        params = random_memory_params(config, heads=2)
        inputs = random_memory_inputs(5, 8, batch=1, heads=2, key_dim=4)
        norms, scales = surprise_norms(params, inputs, config, weight_norms=True)
        figures = inner_figures(params, inputs, config)
        keys, values = inputs[0], inputs[1]
        inner_grad = jax.jit(jax.grad(mem.inner_loss), static_argnums=4)
        chunk_start_weights = {0: mem.init_memory_state(params, 1, config).weights}
        for t in range(8):
            start = t - t % config.chunk_size
            if start not in chunk_start_weights:  # the memory run over the tokens before the chunk
                _, state = mem.memory_apply(params, *(x[:, :, :start] for x in inputs), config)
                chunk_start_weights[start] = state.weights
            for h in range(2):
                w = tuple({k: v[0, h] for k, v in layer.items()} for layer in chunk_start_weights[start])
                n = {k: v[h] for k, v in params["norm"].items()}
                grads = inner_grad(w, n, keys[0, h, t], values[0, h, t], config)
                expected = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
                assert abs(norms[0, h, t] - float(expected)) <= 1e-5 * float(expected)
                weight_norm = jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree.leaves(w)))
                assert abs(scales[0, h, t] - float(weight_norm)) <= 1e-5 * float(weight_norm)
                # by layer of the MLP, and the MLP's output before the residual LayerNorm
                for layer in range(config.depth):
                    np.testing.assert_allclose(figures["surprise"][0, h, t, layer], jnp.sqrt(
                        sum(jnp.sum(g * g) for g in grads[layer].values())), rtol=1e-12)
                    np.testing.assert_allclose(figures["weights"][0, h, t, layer], jnp.sqrt(
                        sum(jnp.sum(leaf * leaf) for leaf in w[layer].values())), rtol=1e-12)
                hidden = mem.ACTIVATIONS[config.activation](keys[0, h, t] @ w[0]["w"] + w[0]["b"])
                np.testing.assert_allclose(figures["norm_input"][0, h, t], jnp.std(hidden @ w[1]["w"] + w[1]["b"]),
                                           rtol=1e-12)
        # from a carried state two tokens into a chunk: that chunk is finished at its start's weights
        _, state = mem.memory_apply(params, *(x[:, :, :2] for x in inputs), config)
        assert int(state.num_pending) == 2
        carried = surprise_norms(params, tuple(x[:, :, 2:] for x in inputs), config, state)
        np.testing.assert_allclose(carried, norms[..., 2:], rtol=1e-6)


@pytest.mark.slow  # compiles and traces a layer's forward+backward (~8 s); classification is tested below
def test_memory_profile_attributes_the_traced_ops_to_forward_backward_and_replay(tmp_path):
    """A tiny layer's profile: every part of the split is present, and the totals add up."""
    import json

    from experiments import memory_profile

    out_file = tmp_path / "profile.json"
    memory_profile.main(["--batch", "1", "--seq", "16", "--d-model", "16", "--heads", "2", "--head-dim", "8",
                         "--chunk", "4", "--repeats", "1", "--top", "5", "--json", str(out_file)])
    summary = json.loads(out_file.read_text())
    parts = summary["phase_region"]
    for part in ("forward / chunk scan", "backward / chunk scan", "recompute / chunk scan",
                 "forward / outside", "backward / outside"):
        assert parts.get(part, 0.0) > 0.0, (part, parts)
    assert sum(parts.values()) == pytest.approx(summary["total_ms"])
    assert sum(summary["kind"].values()) == pytest.approx(summary["total_ms"])
    assert len(summary["top"]) == 5 and all(row["shape"] != "?" for row in summary["top"])


def test_memory_profile_classifies_instructions_by_their_metadata():
    from experiments import memory_profile

    hlo = "\n".join([
        '  %ynn_fusion.3 = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%f, '
        'metadata={op_name="jit(loss)/transpose(jvp(LMMLayer))/vmap()/while/body/closed_call/dot_general"}, '
        'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}',
        '  ROOT %copy.7 = f32[4,8]{0,1} copy(%c), metadata={op_name="jit(loss)/jvp(LMMLayer)/qkv/mul"}',
        '  %add.1 = f32[4]{0} add(%d, %e), metadata={op_name="jit(loss)/transpose(jvp(LMMLayer))/while/body/'
        'checkpoint/rematted_computation/while/body/add"}',
        '  %mul.2 = f32[4]{0} multiply(%d, %e), metadata={op_name="jit(loss)/jvp(LMMLayer)/vmap()/while/body/'
        'closed_call/transpose(jvp())/mul"}',
    ])
    table = memory_profile.instruction_table(hlo)
    assert set(table) == {"ynn_fusion.3", "copy.7", "add.1", "mul.2"}
    assert memory_profile.classify("ynn_fusion.3", table["ynn_fusion.3"]) == ("backward", "chunk scan", "dot")
    assert memory_profile.classify("copy.7", table["copy.7"]) == ("forward", "outside", "copy")
    assert memory_profile.classify("add.1", table["add.1"]) == ("recompute", "chunk scan", "elementwise")
    # the memory's inner-gradient VJP inside the forward pass is forward work
    assert memory_profile.classify("mul.2", table["mul.2"]) == ("forward", "chunk scan", "elementwise")


@pytest.mark.slow  # a benchmark's smoke run (~25 s); the kernel it times is tested in test_pallas_memory
def test_kernel_bench_quick_mode_prints_its_table(capsys, tmp_path):
    import json

    from experiments import kernel_bench

    out_file = tmp_path / "k.json"
    kernel_bench.main(["--quick", "--json", str(out_file)])
    printed = capsys.readouterr().out
    assert "float32 matmul rate" in printed and "| 48 | fused, highest |" in printed
    result = json.loads(out_file.read_text())
    paths = result["results"][0]["paths"]
    assert set(paths) == {"xla, default precision", "xla, highest", "fused, tf32", "fused, tf32x3",
                          "fused, tf32x3, xla backward", "fused, highest", "fused, tf32, 4 warps, 1 stages"}
    assert all(entry["fwd"]["tokens_per_s"] > 0 for entry in paths.values())
    errors = result["results"][0]["errors_vs_float64"]
    assert max(errors.values()) < 1e-5  # float32 against float64: the kernel computes the same function


def test_arch_bench_set_parses_typed_changes_and_keeps_lmm_ones_to_memory_models():
    from experiments import arch_bench

    changes = arch_bench.parse_changes(["lmm.memory.impl=fused", "lmm.memory.chunk_size=32"])
    assert changes == {"lmm.memory.impl": "fused", "lmm.memory.chunk_size": 32}
    assert arch_bench.changes_for("swa", changes) == {}
    assert arch_bench.changes_for("linear", changes) == changes
    with pytest.raises(ValueError, match="expected an integer"):
        arch_bench.parse_changes(["lmm.memory.chunk_size=big"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        arch_bench.parse_changes(["lmm.memory.impl"])
    with pytest.raises(ValueError, match="no field 'impll'"):
        arch_bench.parse_changes(["lmm.memory.impll=fused"])


def test_run_losses_reads_the_last_steps_once_each_and_the_last_books_figure(tmp_path):
    """A resumed run logs steps twice: the later value counts, once; a missing log is named."""
    import json

    from experiments.run_losses import run_losses

    rows = [{"step": s, "loss": 9.0} for s in range(1, 6)] + [{"step": 4, "loss": 2.0}, {"step": 5, "loss": 4.0},
                                                                {"step": 5, "eval/books/bits_per_byte": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert run_losses(tmp_path, steps=2) == {"loss": 3.0, "books_bits_per_byte": 2.5}
    with pytest.raises(FileNotFoundError, match="metrics.jsonl is missing"):
        run_losses(tmp_path / "nowhere")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/books/bits_per_byte": 2.5}))
    with pytest.raises(ValueError, match="logs no training loss yet"):
        run_losses(tmp_path)


def test_run_losses_windows_average_consecutive_steps_once_each(tmp_path):
    """--windows: steps 1-2, 3-4, 5 (the short last window named by its range); a resumed step
    counts with its last value; the table holds every run's windows and books figure."""
    import json

    from experiments.run_losses import loss_windows, windows_table

    rows = [{"step": s, "loss": float(s)} for s in range(1, 6)] + [{"step": 4, "loss": 8.0},
                                                                   {"step": 5, "eval/books/bits_per_byte": 2.5}]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert loss_windows(tmp_path / "a", 2) == [(1, 2, 1.5), (3, 4, 5.5), (5, 5, 5.0)]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0}) for s in (1, 2)))
    table = windows_table([str(tmp_path / "a"), str(tmp_path / "b")], 2).splitlines()
    assert table[0] == "| run | loss 1-2 | loss 3-4 | loss 5-5 | books, bits per byte |"
    assert table[2].endswith("| 1.500 | 5.500 | 5.000 | 2.500 |")
    assert table[3].endswith("| 1.000 | - | - | - |")
    with pytest.raises(ValueError, match="--windows must be >= 1"):
        loss_windows(tmp_path / "a", 0)


def test_model_changes_parse_model_fields_and_name_bad_items():
    """configs.model_changes: what --set gives an evaluation (needle_cue, stream_drift)."""
    from experiments.configs import model_changes

    assert model_changes(["model.lmm.memory.every_layer_floor=true", "model.lmm.theta_max=0.01"]) == {
        "lmm.memory.every_layer_floor": True, "lmm.theta_max": 0.01}
    for item, message in [("lmm.theta_max=0.01", "expected model"), ("model.lmm.theta_max", "expected model"),
                          ("model.lmm.nothing=1", "nothing"), ("model.lmm.memory.depth=two", "depth")]:
        with pytest.raises(ValueError, match=message):
            model_changes([item])

