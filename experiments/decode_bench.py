"""Decoding throughput (tokens/s) of a small model through titans_jax.generate, at a few memory
chunk sizes.

    python experiments/decode_bench.py [--archs lmm,mac] [--chunks 16,64] [--quick]

Only public entry points that did not change across the streaming rewrite are used
(ModelConfig / presets, init_params, generate), so the same script measures an older checkout:
`PYTHONPATH=/path/to/old/checkout python experiments/decode_bench.py` (the 'before' numbers of
experiments/results/decode_bench_cpu.txt came from `git archive` of the commit before the
change, unpacked outside the work tree).

Method: float32, batch --batch, a random prompt of --prompt tokens, greedy decoding. A decode
rate is (n_long - n_short) / (t(n_long) - t(n_short)) for two generate() calls of n_short and
n_long new tokens (best of --repeats each, compiled beforehand), so the prompt's cost and the
dispatch cancel out; on a shared machine the rates are noisy, so the table also gives XLA's flop
count of one compiled decode step, which load cannot disturb. The old decode path recomputed
the whole pending chunk (padded to a chunk) of every memory layer for each token, so its cost
grew with the chunk size; the new one is one step of the recurrence.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

import titans_jax
from titans_jax.models import ModelConfig, init_params


def small_config(arch: str, chunk: int) -> ModelConfig:
    fields = dict(arch=arch, vocab_size=256, d_model=128, num_layers=2, num_heads=4, head_dim=32, mlp_hidden=256,
                  window=64, segment_size=max(64, chunk), num_persistent=4)
    config = ModelConfig(**fields)
    return config.replace({"lmm.memory.chunk_size": chunk})


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def step_flops(model, params, prompt, streaming_api: bool) -> float:
    """XLA's flop count of one compiled one-token decode step after the prompt (a count that
    machine load cannot disturb)."""
    variables = {"params": params}
    token = prompt[:, -1:]
    if streaming_api:
        from titans_jax.models import init_cache

        cache = init_cache(model, params, prompt.shape[0])
        _, cache = model.apply(variables, prompt, cache, logits_at="none")
        step = lambda c: model.apply(variables, token, c)  # noqa: E731
    else:
        _, cache = model.apply(variables, prompt, mode="prefill", max_len=prompt.shape[1] + 1)
        step = lambda c: model.apply(variables, token, c, mode="decode")  # noqa: E731
    cost = jax.jit(step).lower(cache).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def decode_rate(arch: str, chunk: int, args) -> tuple[float, float]:
    config = small_config(arch, chunk)
    model = titans_jax.TitansLM(config)
    params = init_params(config, jax.random.PRNGKey(0))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.prompt), 0, config.vocab_size)
    timings = {}
    for count in (args.short, args.long):
        run = lambda count=count: titans_jax.generate(model, params, prompt, count)[0]  # noqa: E731
        out = run()  # compile
        assert bool(jnp.all((out >= 0) & (out < config.vocab_size)))
        timings[count] = best_time(run, args.repeats)
    rate = args.batch * (args.long - args.short) / (timings[args.long] - timings[args.short])
    return rate, step_flops(model, params, prompt, hasattr(titans_jax.models, "init_cache"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="lmm,mac")
    parser.add_argument("--chunks", default="16,64")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--short", type=int, default=32)
    parser.add_argument("--long", type=int, default=1056)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny run (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.short, args.long, args.repeats, args.chunks = 4, 12, 1, "4"
    streaming_api = hasattr(titans_jax.models, "init_cache")
    print(f"titans_jax from {os.path.dirname(titans_jax.__file__)} "
          f"({'one streaming call shape' if streaming_api else 'old prefill/decode modes'}); jax {jax.__version__}, "
          f"{jax.devices()[0].platform}, batch {args.batch}, prompt {args.prompt}, "
          f"decode rate from {args.short} vs {args.long} new tokens")
    print("| arch | chunk | decode tokens/s | XLA flops per decode step |")
    print("|---|---|---|---|")
    for arch in args.archs.split(","):
        for chunk in (int(c) for c in args.chunks.split(",")):
            rate, flops = decode_rate(arch, chunk, args)
            print(f"| {arch} | {chunk} | {rate:.0f} | {flops:.3g} |", flush=True)


if __name__ == "__main__":
    main()
