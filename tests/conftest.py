"""Settings for the whole test session, applied before any test module imports jax.

The tests compile many small programs and run each once or twice, so compilation is most of
their time. XLA:CPU's backend optimisation level 0 (LLVM's -O0 for the generated code; the
same HLO, the same float semantics) cuts compile time by about 30% (tests/test_lmm.py with
tests/test_streaming.py: 295 s -> 214 s in one process). Fresh processes the tests start
inherit it through the environment. Set XLA_FLAGS with your own
`--xla_backend_optimization_level=N` to test the way users compile (the default is 2).
"""

import os
import pathlib

_LEVEL = "--xla_backend_optimization_level"
if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL}=0".strip()

# The default run's longest files, longest first (seconds of test time in a 2-worker run,
# 2026-12-03, before the slow-tier moves made beside this ordering: 206, 164, 132, 129, 117, 111,
# 68, 64, 61, 50, 43; the rest <= 42; test_pallas_memory.py, added later: ~70 s in one process).
# A file's place only needs to be roughly right. xdist hands each file to one worker in
# collection order (pyproject's addopts turn off its own reordering, which goes by test count
# and so put the 3-test, 2-minute long-context file near the end), so starting with the long
# files leaves short ones for the end and the two workers finish together. Only the order
# changes; a file not listed runs after these, in its usual order.
LONGEST_FIRST = ("test_memory.py", "test_sharding.py", "test_models.py", "test_lmm.py", "test_long_context_table.py",
                 "test_streaming.py", "t2/test_t2_experts.py", "t2/test_t2_titans.py", "test_pallas_memory.py",
                 "test_training.py", "test_scan_layers.py", "test_tnt.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    here = pathlib.Path(__file__).parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(here).as_posix(), len(rank)))  # stable
