"""Does this machine's allocator page-fault large buffers on every call? (A CPU benchmark caveat.)

    python -m experiments.alloc_check

Times y = 2x + 1 on a [2, 4096, 1536] float32 array (48 MiB in, 48 MiB out; jitted, best of 10)
and torch's eager equivalent, in two fresh processes: with this environment's GLIBC_TUNABLES, and
with glibc's mmap and trim thresholds raised to 4 GiB, so that freed large buffers are reused
instead of being unmapped and page-faulted again on the next first touch, and (third process) with
the same thresholds set from inside the process by mallopt(3) before jax is imported (2^31 - 1,
mallopt's largest value), which a program can do without touching its environment. Where the two differ a
lot, eager frameworks (every op allocates its output) are slowed far more than a compiled XLA
program, and benchmark comparisons should be run under both (experiments/memory_bench.py prints
the setting it ran under).
"""

from __future__ import annotations

import os
import subprocess
import sys

TUNED = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"

_CHILD = r"""
import ctypes, sys, time
if sys.argv[1:] == ["mallopt"]:
    libc = ctypes.CDLL("libc.so.6")  # M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3; 1 = accepted
    assert libc.mallopt(-1, 2**31 - 1) == 1 and libc.mallopt(-3, 2**31 - 1) == 1, "mallopt refused"
import jax, jax.numpy as jnp
x = jax.random.normal(jax.random.PRNGKey(0), (2, 4096, 1536))
fn = jax.jit(lambda y: y * 2 + 1)
jax.block_until_ready(fn(x))
best = min((lambda s: (jax.block_until_ready(fn(x)), time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(10))
line = f"jax   {best * 1e3:7.2f} ms"
try:
    import torch
    t = torch.randn(2, 4096, 1536)
    t * 2 + 1
    best = min((lambda s: (t * 2 + 1, time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(10))
    line += f"   torch {best * 1e3:7.2f} ms"
except ImportError:
    pass
print(line)
"""


def main() -> None:
    here = os.environ.get("GLIBC_TUNABLES", "")
    for label, tunables, extra in (("this environment", here, []), ("thresholds raised", TUNED, []),
                                   ("mallopt in-process", here, ["mallopt"])):
        env = dict(os.environ, GLIBC_TUNABLES=tunables)
        out = subprocess.run([sys.executable, "-c", _CHILD, *extra], env=env, capture_output=True, text=True,
                             check=True)
        print(f"y = 2x + 1 on 48 MiB, {label:18s} (GLIBC_TUNABLES={tunables!r}): {out.stdout.strip()}")


if __name__ == "__main__":
    main()
