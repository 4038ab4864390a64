"""Settings for the whole test session, applied before any test module imports jax.

The tests compile many small programs and run each once or twice, so compilation is most of
their time. XLA:CPU's backend optimisation level 0 (LLVM's -O0 for the generated code; the
same HLO, the same float semantics) cuts compile time by about 30% (tests/test_lmm.py with
tests/test_streaming.py: 295 s -> 214 s in one process). Fresh processes the tests start
inherit it through the environment. Set XLA_FLAGS with your own
`--xla_backend_optimization_level=N` to test the way users compile (the default is 2).
"""

import os

_LEVEL = "--xla_backend_optimization_level"
if _LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LEVEL}=0".strip()
