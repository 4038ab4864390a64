"""Benchmark of the LMM layer (Titans long-term memory) on this machine, beside titans-pytorch.

    python -m experiments.memory_bench                 # the README table (batch 2 x 4096, fp32)
    python -m experiments.memory_bench --quick         # a small smoke run (seconds)

    python -m experiments.memory_bench --devices 2     # also: heads split over 2 CPU devices

Prints, in one run:
  * this machine's float32 matmul rate (jit of a 2048^3 matmul, best of N);
  * our LMM layer: forward and forward+backward tokens/s, FLOP/s as a fraction of that rate;
    with --devices N > 1 also the same layer with its heads split over N devices (the logical
    axis "heads" -> the mesh's tensor axis, titans_jax.sharding; on a CPU, N host devices, so the chunk scans of different heads
    run on different cores: XLA:CPU runs the scan's small batched matmuls on one thread);
  * titans-pytorch NeuralMemory on the same shapes (when the `peer` extra is installed), in two
    configurations: its default (every chunk's gradient taken at the weights of the sequence
    start, one parallel pass: a cheaper, different model from the paper's eq. 16) and
    batch_size = chunk (weights committed after every chunk: the chunk-sequential recurrence
    that we compute, with the peer's per-chunk gates and chunk-end retrieval);
  * how time and compiled peak memory grow with sequence length.

The glibc allocator matters on some machines: where large buffers are mmapped afresh on every
call, each first touch page-faults and PyTorch's eager ops pay for it on every op (check with
python -m experiments.alloc_check). Compare both sides under the same environment; the script
prints GLIBC_TUNABLES.

FLOP counts come from XLA's cost analysis. XLA counts a while-loop body once, so the program is
analysed at exactly one chunk (T = chunk_size, one scan iteration, counted exactly) and scaled by
T / chunk_size: every part of the layer is linear in T.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax import LMMConfig, LMMLayer, MemoryConfig, sharding


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
    """Jitted forward and forward+backward (split by heads when traced under a tensor mesh)."""
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


def measure_ours(config: LMMConfig, batch: int, length: int, repeats: int, with_flops: bool = True,
                 devices: int = 1) -> dict:
    """devices > 1: the heads are split over the mesh's tensor axis of that many devices (peak =
    per device)."""
    layer, forward, forward_backward = layer_functions(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, config.d_model), jnp.float32)
    variables = layer.init(jax.random.PRNGKey(1), x[:, : config.memory.chunk_size])
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, tensor=devices), jax.devices()[:devices])
    result = {}
    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        with jax.set_mesh(mesh):
            _, peak = compiled_stats(fn, variables, x)
            seconds = best_time(fn, variables, x, repeats=repeats)
        result[name] = {"seconds": seconds, "tokens_per_s": batch * length / seconds, "peak_bytes": peak}
        if with_flops:
            if length % config.memory.chunk_size:
                raise ValueError("FLOP counting needs the length to be a multiple of chunk_size")
            one_chunk = x[:, : config.memory.chunk_size]
            flops_one_chunk, _ = compiled_stats(fn, variables, one_chunk)
            flops = flops_one_chunk * (length // config.memory.chunk_size)
            result[name].update(flops=flops, flops_per_s=flops / seconds)
    return result


def measure_peer(args, repeats: int, batch_size: int | None) -> dict | None:
    """titans-pytorch NeuralMemory; batch_size None = its default, else weights committed every
    batch_size tokens (= chunk: the chunk-sequential recurrence)."""
    try:
        import torch
        from titans_pytorch import NeuralMemory
    except ImportError as err:
        print(f"[peer] titans-pytorch not installed ({err}); install the extra: pip install -e '.[peer]'")
        return None
    device = torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    memory = NeuralMemory(dim=args.d_model, chunk_size=args.chunk, heads=args.heads, dim_head=args.head_dim,
                          batch_size=batch_size,
                          default_model_kwargs={"depth": args.depth, "expansion_factor": float(args.expansion)}).to(device)
    seq = torch.randn(args.batch, args.seq, args.d_model, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            memory(seq)
        sync()

    def forward_backward():
        memory.zero_grad(set_to_none=True)
        retrieved, _ = memory(seq)
        (retrieved ** 2).mean().backward()
        sync()

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


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark shape (defaults: the README table's), shared with experiments.memory_profile."""
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--remat-every", type=int, default=1)
    parser.add_argument("--surprise-gradient", default="full", choices=("full", "first_order"))


def layer_config(args: argparse.Namespace) -> LMMConfig:
    return LMMConfig(d_model=args.d_model, num_heads=args.heads, head_dim=args.head_dim,
                     memory=MemoryConfig(depth=args.depth, expansion=args.expansion, chunk_size=args.chunk,
                                         remat_every=args.remat_every, surprise_gradient=args.surprise_gradient))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the peer (XLA uses all cores)")
    parser.add_argument("--scaling", default="1024,4096,16384,65536",
                        help="comma-separated sequence lengths (batch 1) for the scaling table; '' to skip")
    parser.add_argument("--devices", type=int, default=1,
                        help="also measure the layer with its heads split over this many devices (CPU: host devices)")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.d_model, args.heads, args.head_dim, args.chunk = 1, 256, 64, 2, 16, 16
        args.scaling, args.repeats = "128", 1

    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before the first use of the backend
        if jax.device_count() < args.devices:
            raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} {jax.default_backend()} device(s)")
    config = layer_config(args)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    rate = matmul_rate(args.repeats)
    print(f"float32 matmul rate (2048^3, jit): {rate / 1e9:.1f} GFLOP/s")
    hidden = args.expansion * args.head_dim if args.depth > 1 else args.head_dim
    small = chunk_matmul_rate(args.batch, args.heads, args.chunk, args.head_dim, hidden, args.repeats)
    print(f"float32 rate of the matmuls inside the chunk scan ({args.batch * args.heads} x "
          f"[{args.chunk}x{args.head_dim}]@[{args.head_dim}x{hidden}]): {small / 1e9:.1f} GFLOP/s")
    print(f"shape: batch {args.batch} x {args.seq} tokens, d_model {args.d_model}, {args.heads} heads x {args.head_dim}, "
          f"memory depth {args.depth} expansion {args.expansion}, chunk {args.chunk}, float32"
          + ("" if args.surprise_gradient == "full" else
             f", surprise_gradient {args.surprise_gradient} (ours only: the peer's gradient is unchanged)") + "\n")

    rows = {"ours, 1 device": measure_ours(config, args.batch, args.seq, args.repeats)}
    if args.devices > 1:
        sharded = measure_ours(config, args.batch, args.seq, args.repeats, with_flops=False, devices=args.devices)
        for name in ("fwd", "fwd+bwd"):  # the same program, split: the same FLOPs
            flops = rows["ours, 1 device"][name]["flops"]
            sharded[name].update(flops=flops, flops_per_s=flops / sharded[name]["seconds"])
        rows[f"ours, heads over {args.devices} devices"] = sharded
    peers = {}
    if not args.no_peer:
        for label, batch_size in (("peer, default", None), ("peer, batch_size = chunk", args.chunk)):
            result = measure_peer(args, args.repeats, batch_size)
            if result is None:
                break
            peers[label] = result
    header = (f"| {'':34} | {'fwd tok/s':>9} | {'of matmul':>9} | {'peak MiB':>8} | {'f+b tok/s':>9} | "
              f"{'of matmul':>9} | {'peak MiB':>8} |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for label, row in {**rows, **peers}.items():
        cells = []
        for name in ("fwd", "fwd+bwd"):
            fraction = f"{row[name]['flops_per_s'] / rate:9.1%}" if "flops_per_s" in row[name] else f"{'':9}"
            peak = f"{row[name]['peak_bytes'] / 2**20:8.0f}" if "peak_bytes" in row[name] else f"{'':8}"
            cells.append(f"{row[name]['tokens_per_s']:9.0f} | {fraction} | {peak}")
        print(f"| {label:34} | " + " | ".join(cells) + " |")
    if peers:
        print("\nours / peer, tokens/s (fwd, fwd+bwd)")
        for label, row in rows.items():
            ratios = [f"{peer_label}: {row['fwd']['tokens_per_s'] / peer['fwd']['tokens_per_s']:.2f}x, "
                      f"{row['fwd+bwd']['tokens_per_s'] / peer['fwd+bwd']['tokens_per_s']:.2f}x"
                      for peer_label, peer in peers.items()]
            print(f"  {label:34} vs " + "; ".join(ratios))

    scaling = []
    lengths = [int(n) for n in args.scaling.split(",") if n]
    if lengths:
        print(f"\nscaling with sequence length (batch 1, {args.devices} device(s); peak = XLA's compiled temp + "
              "argument + output bytes, per device)")
        print(f"| {'tokens':>7} | {'fwd s':>7} | {'fwd tok/s':>9} | {'fwd MiB':>8} | {'fwd+bwd s':>9} | {'f+b tok/s':>9} | {'f+b MiB':>8} |")
        print("|---------|---------|-----------|----------|-----------|-----------|----------|")
        for length in lengths:
            row = measure_ours(config, 1, length, max(1, args.repeats - 1), with_flops=False, devices=args.devices)
            scaling.append({"tokens": length, **row})
            print(f"| {length:7d} | {row['fwd']['seconds']:7.3f} | {row['fwd']['tokens_per_s']:9.0f} | "
                  f"{row['fwd']['peak_bytes'] / 2**20:8.0f} | {row['fwd+bwd']['seconds']:9.3f} | "
                  f"{row['fwd+bwd']['tokens_per_s']:9.0f} | {row['fwd+bwd']['peak_bytes'] / 2**20:8.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "matmul_flops_per_s": rate, "chunk_matmul_flops_per_s": small, "ours": rows, "peer": peers,
                       "scaling": scaling, "config": dataclasses.asdict(config)}, handle, indent=2)


if __name__ == "__main__":
    main()
