"""Max errors between the three memory implementations, float64, outputs and gradients.

    python -m experiments.memory_equivalence

The same comparison the tests make (tests/test_memory.py), over the full matrix of memory
depth x chunk size and the variants, printed as a table of the largest relative difference
(|a - b| / max(1, max |b|) per leaf) against the token-by-token reference.
"""

from __future__ import annotations

import argparse

from titans_jax.testing import VARIANTS, max_relative_difference, run_all_implementations

def compare(depth: int, chunk_size: int, variant: str) -> dict[str, tuple[float, float]]:
    results = run_all_implementations(depth, chunk_size, variant)
    ref_out, ref_grads = results["reference"]
    return {impl: (max_relative_difference(results[impl][0], ref_out),
                   max_relative_difference(results[impl][1], ref_grads))
            for impl in ("chunked", "associative")}


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


if __name__ == "__main__":
    main()
