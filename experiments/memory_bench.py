"""Benchmark of the LMM layer (Titans long-term memory) on this machine, beside titans-pytorch.

    python -m experiments.memory_bench                 # the README table (batch 2 x 4096, fp32)
    python -m experiments.memory_bench --quick         # a small smoke run (seconds)

Prints, in one run:
  * this machine's float32 matmul rate (jit of a 2048^3 matmul, best of N);
  * our LMM layer: forward and forward+backward tokens/s, FLOP/s as a fraction of that rate;
  * titans-pytorch NeuralMemory on the same shapes (when the `peer` extra is installed);
  * how time and compiled peak memory grow with sequence length.

FLOP counts come from XLA's cost analysis. XLA counts a while-loop body once, so the program is
analysed at exactly one chunk (T = chunk_size, one scan iteration, counted exactly) and scaled by
T / chunk_size: every part of the layer is linear in T.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import LMMConfig, LMMLayer


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rate(repeats: int, size: int = 2048) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    seconds = best_time(jax.jit(jnp.matmul), a, b, repeats=max(repeats, 5))
    return 2 * size**3 / seconds


def chunk_matmul_rate(batch: int, heads: int, chunk: int, head_dim: int, hidden: int, repeats: int) -> float:
    """Rate of the matmuls inside the chunk scan: B*H independent [C, K] @ [K, hidden] products."""
    x = jax.random.normal(jax.random.PRNGKey(2), (batch * heads, chunk, head_dim), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(3), (batch * heads, head_dim, hidden), jnp.float32)
    fn = jax.jit(lambda a, b: jnp.einsum("sck,skh->sch", a, b))
    seconds = best_time(fn, x, w, repeats=max(repeats, 20))
    return 2 * batch * heads * chunk * head_dim * hidden / seconds


def layer_functions(config: LMMConfig):
    layer = LMMLayer(config)

    def forward(variables, x):
        return layer.apply(variables, x)[0]

    def loss(variables, x):
        return jnp.mean(layer.apply(variables, x)[0] ** 2)

    return layer, jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def compiled_stats(fn, *args) -> tuple[float, int]:
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    peak = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    return float(cost["flops"]), int(peak)


def measure_ours(config: LMMConfig, batch: int, length: int, repeats: int, with_flops: bool = True) -> dict:
    layer, forward, forward_backward = layer_functions(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, config.d_model), jnp.float32)
    variables = layer.init(jax.random.PRNGKey(1), x[:, : config.chunk_size])
    result = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        _, peak = compiled_stats(fn, variables, x)
        seconds = best_time(fn, variables, x, repeats=repeats)
        result[name] = {"seconds": seconds, "tokens_per_s": batch * length / seconds, "peak_bytes": peak}
        if with_flops:
            if length % config.chunk_size:
                raise ValueError("FLOP counting needs the length to be a multiple of chunk_size")
            one_chunk = x[:, : config.chunk_size]
            flops_one_chunk, _ = compiled_stats(fn, variables, one_chunk)
            flops = flops_one_chunk * (length // config.chunk_size)
            result[name].update(flops=flops, flops_per_s=flops / seconds)
    return result


def measure_peer(args, repeats: int) -> dict | None:
    try:
        import torch
        from titans_pytorch import NeuralMemory
    except ImportError as err:
        print(f"[peer] titans-pytorch not installed ({err}); install the extra: pip install -e '.[peer]'")
        return None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    memory = NeuralMemory(dim=args.d_model, chunk_size=args.chunk, heads=args.heads, dim_head=args.head_dim,
                          default_model_kwargs={"depth": args.depth, "expansion_factor": float(args.expansion)})
    seq = torch.randn(args.batch, args.seq, args.d_model)

    def forward():
        with torch.no_grad():
            memory(seq)

    def forward_backward():
        memory.zero_grad(set_to_none=True)
        retrieved, _ = memory(seq)
        (retrieved ** 2).mean().backward()

    result = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds = min(times)
        result[name] = {"seconds": seconds, "tokens_per_s": args.batch * args.seq / seconds}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--remat-every", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the peer (XLA uses all cores)")
    parser.add_argument("--scaling", default="1024,4096,16384,65536",
                        help="comma-separated sequence lengths (batch 1) for the scaling table; '' to skip")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.d_model, args.heads, args.head_dim, args.chunk = 1, 256, 64, 2, 16, 16
        args.scaling, args.repeats = "128,512", 1

    config = LMMConfig(d_model=args.d_model, num_heads=args.heads, head_dim=args.head_dim,
                       memory_depth=args.depth, memory_expansion=args.expansion, chunk_size=args.chunk,
                       remat_every=args.remat_every)
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    rate = matmul_rate(args.repeats)
    print(f"float32 matmul rate (2048^3, jit): {rate / 1e9:.1f} GFLOP/s")
    hidden = args.expansion * args.head_dim if args.depth > 1 else args.head_dim
    small = chunk_matmul_rate(args.batch, args.heads, args.chunk, args.head_dim, hidden, args.repeats)
    print(f"float32 rate of the matmuls inside the chunk scan ({args.batch * args.heads} x "
          f"[{args.chunk}x{args.head_dim}]@[{args.head_dim}x{hidden}]): {small / 1e9:.1f} GFLOP/s")
    print(f"shape: batch {args.batch} x {args.seq} tokens, d_model {args.d_model}, {args.heads} heads x {args.head_dim}, "
          f"memory depth {args.depth} expansion {args.expansion}, chunk {args.chunk}, float32\n")

    ours = measure_ours(config, args.batch, args.seq, args.repeats)
    peer = None if args.no_peer else measure_peer(args, args.repeats)
    header = f"| {'':8} | {'ours tok/s':>10} | {'GFLOP/s':>8} | {'of matmul':>9} | {'peak MiB':>8} | {'peer tok/s':>10} | {'ours/peer':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for name in ("fwd", "fwd+bwd"):
        row = ours[name]
        peer_tps = peer[name]["tokens_per_s"] if peer else float("nan")
        print(f"| {name:8} | {row['tokens_per_s']:10.0f} | {row['flops_per_s'] / 1e9:8.1f} | {row['flops_per_s'] / rate:9.1%} "
              f"| {row['peak_bytes'] / 2**20:8.0f} | {peer_tps:10.0f} | {row['tokens_per_s'] / peer_tps:9.2f} |")

    scaling = []
    lengths = [int(n) for n in args.scaling.split(",") if n]
    if lengths:
        print("\nscaling with sequence length (batch 1; peak = XLA's compiled temp + argument + output bytes)")
        print(f"| {'tokens':>7} | {'fwd s':>7} | {'fwd tok/s':>9} | {'fwd MiB':>8} | {'fwd+bwd s':>9} | {'f+b tok/s':>9} | {'f+b MiB':>8} |")
        print("|---------|---------|-----------|----------|-----------|-----------|----------|")
        for length in lengths:
            row = measure_ours(config, 1, length, max(1, args.repeats - 1), with_flops=False)
            scaling.append({"tokens": length, **row})
            print(f"| {length:7d} | {row['fwd']['seconds']:7.3f} | {row['fwd']['tokens_per_s']:9.0f} | "
                  f"{row['fwd']['peak_bytes'] / 2**20:8.0f} | {row['fwd+bwd']['seconds']:9.3f} | "
                  f"{row['fwd+bwd']['tokens_per_s']:9.0f} | {row['fwd+bwd']['peak_bytes'] / 2**20:8.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "matmul_flops_per_s": rate, "chunk_matmul_flops_per_s": small, "ours": ours, "peer": peer,
                       "scaling": scaling, "config": dataclasses.asdict(config)}, handle, indent=2)


if __name__ == "__main__":
    main()
