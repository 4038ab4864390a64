"""Prefill and decode throughput of SmolLM2-135M-Instruct: t2_jax beside Hugging Face
transformers (PyTorch), same dequantised weights, same run, same threads.

    python -m t2_jax.fetch smollm2
    python experiments/t2_bench.py --batch 1 --prompt-len 128 --new-tokens 64

Prefill: one forward over B x T prompt tokens filling a KV cache (tokens/s = B*T / time).
Decode: greedy steps of one token per row with the cache (tokens/s = B*(N-1) / time; ours is the
jitted while-loop `t2_jax.decode`, HF a loop over model(next_token, cache=...)).
Times are the best of --repeats after one warm-up (which includes jit compilation for ours).
Both libraries use the CPUs the process may run on: `taskset -c 0 python ...` pins both to one.
The prompt is the opening of Pride and Prejudice when cached, else seeded random tokens.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import t2_jax
from t2_jax import fetch, testing


def usable_cpus() -> int:
    """CPUs this process may run on (respects `taskset`; XLA sizes its pool the same way)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def best_time(fn, repeats):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prompt_tokens(tokenizer, batch, length, vocab, seed=0):
    if fetch.austen_path().exists():
        ids = tokenizer.encode(fetch.austen_path().read_text(encoding="utf-8")[:20000])
        rows = [ids[i * length:(i + 1) * length] for i in range(batch)]
        return np.asarray(rows, np.int32), "Pride and Prejudice"
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (batch, length), dtype=np.int32), "random tokens"


def bench_ours(params, config, tokens, new_tokens, repeats):
    B, T = tokens.shape
    mask = jnp.ones((B, T), jnp.int32)
    tokens = jnp.asarray(tokens)

    def run_prefill():
        logits, cache = t2_jax.prefill(params, config, tokens, mask, T + new_tokens)
        jax.block_until_ready(cache["k"])
        return logits, cache

    prefill_s = best_time(run_prefill, repeats)
    logits, cache = run_prefill()
    key = jax.random.key(0)

    def run_decode():
        out = t2_jax.decode(params, config, cache, logits, key, new_tokens)
        return np.asarray(out.tokens)

    decode_s = best_time(run_decode, repeats)
    return prefill_s, decode_s, run_decode()


def bench_hf(model, tokens, new_tokens, repeats):
    import torch

    ids = torch.tensor(tokens, dtype=torch.long)
    # transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values")

    def returned_cache(out):
        cache = getattr(out, "cache", None)
        return out.past_key_values if cache is None else cache

    def prefill():
        with torch.inference_mode():
            out = model(ids, use_cache=True)
        return out.logits[:, -1], returned_cache(out)

    prefill_s = best_time(prefill, repeats)

    def decode(logits, past):
        with torch.inference_mode():
            token = logits.argmax(-1, keepdim=True)
            generated = [token]
            for _ in range(new_tokens - 1):
                out = model(token, use_cache=True, **{cache_arg: past})
                past = returned_cache(out)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(token)
        return torch.cat(generated, 1).numpy()

    def timed_decode():
        logits, past = prefill()  # outside the clock
        start = time.perf_counter()
        generated = decode(logits, past)
        return time.perf_counter() - start, generated

    timed_decode()  # warm-up
    runs = [timed_decode() for _ in range(repeats)]
    return prefill_s, min(t for t, _ in runs), runs[0][1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true", help="only time t2_jax")
    args = parser.parse_args(argv)

    path = fetch.require_smollm2()
    params, config = t2_jax.load_gguf(path)
    tokenizer = t2_jax.load_tokenizer(path)
    tokens, source = prompt_tokens(tokenizer, args.batch, args.prompt_len, config.vocab_size)
    B, T, N = args.batch, args.prompt_len, args.new_tokens
    rows = []
    prefill_s, decode_s, ours_tokens = bench_ours(params, config, tokens, N, args.repeats)
    rows.append(("t2_jax (jax.jit, float32)", prefill_s, decode_s))
    versions = f"jax {jax.__version__}"
    agreement = ""
    if not args.skip_hf:
        import torch
        import transformers

        torch.set_num_threads(usable_cpus())
        model = testing.hf_model_from_params(params, config)
        hf_prefill, hf_decode, hf_tokens = bench_hf(model, tokens, N, args.repeats)
        rows.append(("transformers (PyTorch eager, sdpa, float32)", hf_prefill, hf_decode))
        versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
        same = [int(np.argmax(np.append(a != b, True))) for a, b in zip(ours_tokens, hf_tokens)]
        verdict = "all rows identical" if min(same) == N else "then float rounding differs"
        agreement = f"greedy tokens identical for the first {min(same)} of {N} per row ({verdict})"

    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32), batch {B}, prompt {T} "
          f"tokens ({source}), {N} new tokens, best of {args.repeats}")
    print(f"{platform.processor() or platform.machine()}, {usable_cpus()} of {os.cpu_count()} CPUs "
          f"usable; {versions}")
    print()
    print("| implementation | prefill tokens/s | decode tokens/s | prefill ms | decode ms/token |")
    print("|---|---:|---:|---:|---:|")
    for name, p, d in rows:
        print(f"| {name} | {B * T / p:,.0f} | {B * (N - 1) / d:,.1f} | {p * 1e3:.0f} | "
              f"{d * 1e3 / (N - 1):.1f} |")
    if agreement:
        print()
        print(agreement)


if __name__ == "__main__":
    main()
