#!/usr/bin/env bash
# The GPU checks of the fused linear-memory kernels (titans_jax/pallas_memory.py) as one script for a
# lent GPU machine (about 8-9 minutes on an H200, mostly compilation), from the repository root:
#
#   bash experiments/device_kernels.sh            # writes into $OUT (the device tool's folder) or runs/device_kernels
#
# 1. experiments.kernel_bench: the forward beside XLA's chunked path at every precision, forward+backward with the
#    fused backward kernel and with backward="xla", and the errors against float64;
# 2. the small "linear" model's training step at 4K x 8 (experiments.arch_bench), XLA's memory then the kernels,
#    in one process each (the peer of the README's H200 arch_bench table: 584K / 142K tok/s fwd / fwd+bwd).
# Each step has its own time limit, so one that fails or hangs leaves the others their time.
set -o pipefail
out=${OUT:-runs/device_kernels}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$out/device.txt"
timeout 240 python3 -m experiments.kernel_bench --json "$out/kernel_bench.json" 2>&1 | tee "$out/kernel_bench.txt"
for impl in chunked fused; do
  timeout 150 python3 -m experiments.arch_bench --preset small --lengths 4096 --batch 8 --repeats 3 --archs linear \
      --set lmm.memory.impl=$impl --json "$out/arch_linear_$impl.json" 2>&1 | tee "$out/arch_linear_$impl.txt"
done
