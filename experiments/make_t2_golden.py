"""Write the golden fixtures of tests/t2/test_t2_golden.py: for each family (llama, llama-bias,
qwen2, mistral) a tiny random checkpoint saved by transformers and the logits / greedy tokens
transformers computes from it. Needs the `hf` extra:

    pip install -e ".[hf]" && python experiments/make_t2_golden.py      # -> tests/t2/golden/

The files are deterministic (seeded); rerun after changing t2_jax.testing.write_golden_fixture
and commit the result.
"""

from __future__ import annotations

import argparse
import pathlib

from t2_jax import testing

DEFAULT_DIRECTORY = pathlib.Path(__file__).resolve().parents[1] / "tests" / "t2" / "golden"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_DIRECTORY,
                        help="directory to write one sub-directory per family into")
    parser.add_argument("--families", nargs="+", default=list(testing.GOLDEN_FAMILIES),
                        choices=testing.GOLDEN_FAMILIES)
    args = parser.parse_args(argv)
    for family in args.families:
        directory = testing.write_golden_fixture(args.out / family, family)
        sizes = {f.name: f.stat().st_size for f in sorted(directory.iterdir())}
        print(f"{directory}: " + ", ".join(f"{name} {size / 1024:.1f} KiB"
                                           for name, size in sizes.items()))


if __name__ == "__main__":
    main()
