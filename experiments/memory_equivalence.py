"""Max errors between the memory implementations, float64, outputs and gradients.

    python -m experiments.memory_equivalence

The same comparison the tests make (tests/test_memory.py, tests/test_pallas_memory.py), over the
full matrix of memory depth x chunk size and the variants, printed as a table of the largest
relative difference (|a - b| / max(1, max |b|) per leaf) against the token-by-token reference;
then the fused Pallas kernels of the linear memory (impl="fused", forward and backward kernel,
run in Pallas' interpret mode on CPU) over chunk sizes and the variants that apply to them.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax

from titans_jax import memory as mem
from titans_jax.testing import (VARIANTS, max_relative_difference, objective_and_grads, random_memory_inputs,
                                random_memory_params, run_all_implementations)

# the linear memory's variants the fused kernels cover (no biases): MemoryConfig changes, dropped gate
FUSED_VARIANTS = {
    "plain": ({"residual_norm": False}, None),
    "residual_norm": ({}, None),
    "no_momentum": ({}, 4),
    "no_forgetting": ({"residual_norm": False}, 5),
    "mean_loss": ({"loss_scale": 1.0 / 6}, None),
    "first_order": ({"surprise_gradient": "first_order"}, None),
    "surprise_clip": ({"surprise_clip": 0.5}, None),
}


def compare(depth: int, chunk_size: int, variant: str) -> dict[str, tuple[float, float]]:
    results = run_all_implementations(depth, chunk_size, variant)
    ref_out, ref_grads = results["reference"]
    return {impl: (max_relative_difference(results[impl][0], ref_out),
                   max_relative_difference(results[impl][1], ref_grads))
            for impl in ("chunked", "associative")}


def compare_fused(chunk_size: int, variant: str, length: int = 23) -> tuple[float, float]:
    """(outputs, gradients) of impl="fused" against the reference, float64, depth 1."""
    changes, dropped = FUSED_VARIANTS[variant]
    with jax.enable_x64(True):
        inputs = list(random_memory_inputs(0, length))
        if dropped is not None:
            inputs[dropped] = None
        config = mem.MemoryConfig(key_dim=6, value_dim=6, depth=1, chunk_size=chunk_size, impl="fused", **changes)
        params = random_memory_params(config)
        (_, out), grads = objective_and_grads(config)(params, *inputs)
        (_, ref_out), ref_grads = objective_and_grads(dataclasses.replace(config, impl="reference"))(params, *inputs)
        return max_relative_difference(out, ref_out), max_relative_difference(grads, ref_grads)


def main(argv=None):
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    cases = [(d, c, "plain") for d in (1, 2, 3) for c in (1, 3, 16, 5)]
    cases += [(2, 5, v) for v in VARIANTS if v != "plain"]
    print("| depth | chunk | variant | chunked out | chunked grads | associative out | associative grads |")
    print("|---|---|---|---|---|---|---|")
    worst = [0.0, 0.0]
    for depth, chunk, variant in cases:
        errors = compare(depth, chunk, variant)
        worst = [max(worst[0], errors["chunked"][0], errors["associative"][0]),
                 max(worst[1], errors["chunked"][1], errors["associative"][1])]
        print(f"| {depth} | {chunk} | {variant} | {errors['chunked'][0]:.1e} | {errors['chunked'][1]:.1e} | "
              f"{errors['associative'][0]:.1e} | {errors['associative'][1]:.1e} |", flush=True)
    print(f"\nworst relative difference vs reference: outputs {worst[0]:.1e}, gradients {worst[1]:.1e} "
          "(sequence length 23, float64)")

    print("\nThe fused kernels (impl=\"fused\", linear memory, interpret mode):\n")
    print("| chunk | variant | fused out | fused grads |")
    print("|---|---|---|---|")
    worst = [0.0, 0.0]
    cases = [(c, "residual_norm") for c in (1, 3, 16, 5)] + [(5, v) for v in FUSED_VARIANTS if v != "residual_norm"]
    for chunk, variant in cases:
        errors = compare_fused(chunk, variant)
        worst = [max(worst[0], errors[0]), max(worst[1], errors[1])]
        print(f"| {chunk} | {variant} | {errors[0]:.1e} | {errors[1]:.1e} |", flush=True)
    print(f"\nworst relative difference vs reference: outputs {worst[0]:.1e}, gradients {worst[1]:.1e} "
          "(sequence length 23, float64)")


if __name__ == "__main__":
    main()
