"""Dense projections: autodiff's backward vs titans_jax.projection's, side by side in one process.

    python -m experiments.projection_bench            # the numbers quoted in the README / projection.py

Times (best of --rounds, the two variants interleaved so that machine drift hits both):
  * the LMM layer's q/k/v projection alone, x [2, 4096, 512] @ W [512, 1536], forward+backward
    of sum(y^2), as GFLOP/s of its three matmuls;
  * the whole LMM layer (batch 2 x 4096, d 512, 8 x 64 heads, default memory) forward+backward,
    tokens/s, with its Dense layers on jax.lax.dot_general vs dense_dot_general.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import titans_jax.lmm as lmm_lib
from titans_jax import LMMConfig, LMMLayer
from titans_jax.projection import projection_matmul


def interleaved_best(fns: dict, args: tuple, rounds: int) -> dict:
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4096, 512))
    w = jax.random.normal(jax.random.PRNGKey(1), (512, 1536)) * 0.02
    plain = lambda x, w: jax.lax.dot_general(x, w, (((2,), (0,)), ((), ())))  # noqa: E731
    fns = {name: jax.jit(jax.grad(lambda x, w, op=op: jnp.sum(op(x, w) ** 2), argnums=(0, 1)))
           for name, op in (("autodiff", plain), ("projection_matmul", projection_matmul))}
    flops = 3 * 2 * x.shape[0] * x.shape[1] * x.shape[2] * w.shape[1]
    best = interleaved_best(fns, (x, w), args.rounds)
    for name, seconds in best.items():
        print(f"qkv projection fwd+bwd, {name:18s}: {flops / seconds / 1e9:7.1f} GFLOP/s")

    config = LMMConfig(d_model=512, num_heads=8, head_dim=64)
    layer = LMMLayer(config)
    variables = layer.init(jax.random.PRNGKey(2), x[:, : config.memory.chunk_size])

    def layer_grad(dot_general):
        def loss(v, x):
            saved = lmm_lib.dense_dot_general
            lmm_lib.dense_dot_general = dot_general  # read when the layer's Dense modules are built
            try:
                return jnp.mean(layer.apply(v, x)[0] ** 2)
            finally:
                lmm_lib.dense_dot_general = saved
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    fns = {"autodiff": layer_grad(jax.lax.dot_general), "projection_matmul": layer_grad(lmm_lib.dense_dot_general)}
    best = interleaved_best(fns, (variables, x), args.rounds)
    for name, seconds in best.items():
        print(f"LMM layer fwd+bwd,      {name:18s}: {x.shape[0] * x.shape[1] / seconds:7.0f} tok/s")


if __name__ == "__main__":
    main()
