"""How far float32 RoPE moves attention scores at large positions: the plain product p * f
(`primitives.rope`, Hugging Face's form) against the fixed-point phases titans_jax uses
(`primitives.rope_phase_angles`), each against float64.

    python -m experiments.rope_precision

A query at position p against keys 0-127 tokens back (what sliding-window attention sees in a
streamed context), 4 heads of dim 64, unit-normal q and k, scores q.k / sqrt(64); the column is
the largest |float32 score - float64 score| over the 4 x 128 pairs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import attention, primitives


def score_errors(position: int, head_dim: int = 64, window: int = 128, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, 1, 4, head_dim)), rng.standard_normal((1, window, 4, head_dim))
    query_pos, key_pos = jnp.array([position]), jnp.asarray(position - np.arange(window))
    inverse = primitives.rope_inverse_frequencies(head_dim, 10000.0, jnp.float32)

    def scores(rotate, dtype):
        rq, rk = rotate(jnp.asarray(q, dtype), query_pos), rotate(jnp.asarray(k, dtype), key_pos)
        return np.asarray(jnp.einsum("bqhe,bkhe->bhqk", rq, rk), np.float64) / np.sqrt(head_dim)

    with jax.enable_x64(True):
        exact = scores(attention.rope, jnp.float64)
        plain = scores(lambda x, p: primitives.rope(x, p, inverse), jnp.float32)
        phase = scores(attention.rope, jnp.float32)
    return float(np.abs(plain - exact).max()), float(np.abs(phase - exact).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", default="1000,65536,262144,1048576,2097152")
    args = parser.parse_args(argv)
    print("| query position | plain float32 p * f | fixed-point phases |")
    print("|---|---|---|")
    for position in (int(p) for p in args.positions.split(",")):
        plain, phase = score_errors(position)
        print(f"| {position:,} | {plain:.1e} | {phase:.1e} |")


if __name__ == "__main__":
    main()
