"""Fixed long-context evaluation sets as tensorflow-datasets builders (array_record, no TensorFlow).

    from titans_jax.long_context.eval_sets import EvalSetSpec, build_eval_set, load_eval_set
    spec = EvalSetSpec(tasks=("niah_single_1", "niah_single_2"), lengths=(2048, 4096),
                       depths=(0.0, 0.5, 1.0), num_per_cell=4, seed=0)
    source = load_eval_set(spec)          # builds once under <cache>/tfds, then reads
    row = source[0]                       # {"key": "niah_single_1/L2048/d0/s0", "prompt": ..., ...}
    by_key = examples_by_key(source)      # key -> row

Every example is keyed by (task, length, depth, seed) (`titans_jax.long_context.example_key`), so
results compare across runs and machines. The tfds builder `titans_long_context` has one config
per evaluation set; the config name is `<name>-<digest>` where the digest hashes everything that
defines the examples: GENERATOR_VERSION, the spec (tasks, lengths, depths, seeds, options), the
tokenizer fingerprint and every haystack's fingerprint (its documents' sha256s and the splitter
version). The builder VERSION is `GENERATOR_VERSION.0.0`. Change any of these and the set gets a
new name and folder instead of silently reusing stale examples.

Features per example: key, task, prompt, answer, question, answer_prefix, haystack (name),
length / requested_length / seed (int64), depth_lo / depth_hi (float32; niah: both the depth),
needle_chars / needle_tokens (int64 [n, 2] spans), context_chars (int64 [2]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from titans_jax.downloads import cache_root, exclusive_lock
from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.long_context import tasks as tasks_lib
from titans_jax.long_context.haystacks import Haystack, get_haystack


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    """What an evaluation set holds: tasks x lengths x depths x num_per_cell seeds (seed, seed+1,
    ...). `haystacks` maps a task to a haystack name (default: the task's own); a Haystack object
    is accepted too (e.g. in tests). depths: None entries mean "niah: a RULER depth drawn from the
    seed; qa: anywhere"; qa tasks also accept (lo, hi) windows."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple = (None,)
    num_per_cell: int = 1
    seed: int = 0
    qa_examples: bool = False
    name: str = "eval"
    haystacks: tuple = ()   # ((task, haystack name or Haystack), ...)

    def __post_init__(self):
        for field in ("tasks", "lengths", "depths", "haystacks"):
            value = getattr(self, field)
            object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
        unknown = [t for t in self.tasks if t not in tasks_lib.TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown or no tasks {unknown}; expected some of {tasks_lib.TASKS}")
        if not self.lengths or any(int(n) <= 0 for n in self.lengths):
            raise ValueError(f"lengths must be positive ints, got {self.lengths}")
        if self.num_per_cell < 1:
            raise ValueError(f"num_per_cell must be >= 1, got {self.num_per_cell}")
        if not self.name.replace("_", "").isalnum():
            raise ValueError(f"name must be alphanumeric (underscores allowed), got {self.name!r}")

    def haystack_for(self, task: str) -> Haystack:
        chosen = dict(self.haystacks).get(task, tasks_lib.DEFAULT_HAYSTACK[task])
        return chosen if isinstance(chosen, Haystack) else get_haystack(chosen)


def _depth_key(depth):
    return None if depth is None else list(depth) if isinstance(depth, (tuple, list)) else float(depth)


def spec_digest(spec: EvalSetSpec, tokenizer_fingerprint: str) -> str:
    """sha256 (16 hex digits) of everything that defines the examples of `spec`."""
    payload = {
        "generator_version": tasks_lib.GENERATOR_VERSION,
        "tasks": list(spec.tasks), "lengths": [int(n) for n in spec.lengths],
        "depths": [_depth_key(d) for d in spec.depths], "num_per_cell": spec.num_per_cell,
        "seed": spec.seed, "qa_examples": spec.qa_examples, "tokenizer": tokenizer_fingerprint,
        "haystacks": {task: spec.haystack_for(task).fingerprint for task in spec.tasks},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class EvalSetConfig(tfds.core.BuilderConfig):
    spec: EvalSetSpec | None = None
    tokenizer: object = None


class TitansLongContext(tfds.core.GeneratorBasedBuilder):
    """Fixed long-context evaluation sets (S-NIAH, BABILong QA1-QA5) generated from local text."""

    VERSION = tfds.core.Version(f"{tasks_lib.GENERATOR_VERSION}.0.0")
    RELEASE_NOTES = {f"{tasks_lib.GENERATOR_VERSION}.0.0": "Generator version "
                     f"{tasks_lib.GENERATOR_VERSION}."}

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "key": text, "task": text, "prompt": text, "answer": text, "question": text,
                "answer_prefix": text, "haystack": text,
                "length": np.int64, "requested_length": np.int64, "seed": np.int64,
                "depth_lo": np.float32, "depth_hi": np.float32,
                "needle_chars": tfds.features.Tensor(shape=(None, 2), dtype=np.int64),
                "needle_tokens": tfds.features.Tensor(shape=(None, 2), dtype=np.int64),
                "context_chars": tfds.features.Tensor(shape=(2,), dtype=np.int64),
            }),
            supervised_keys=None,
            homepage="https://github.com/NVIDIA/RULER",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: the haystacks come from the local cache
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        spec, tokenizer = self.builder_config.spec, self.builder_config.tokenizer
        for task in spec.tasks:
            haystack = spec.haystack_for(task)
            examples = tasks_lib.make_examples(task, spec.lengths, spec.depths, spec.num_per_cell,
                                               spec.seed, tokenizer, haystack, spec.qa_examples)
            for requested_depth, example in zip(
                    [d for _ in spec.lengths for d in spec.depths for _ in range(spec.num_per_cell)],
                    examples):
                key = tasks_lib.example_key(task, example.requested_length, requested_depth,
                                            example.seed)
                depth = example.depth if isinstance(example.depth, tuple) else (example.depth,) * 2
                yield key, {
                    "key": key, "task": task, "prompt": example.prompt, "answer": example.answer,
                    "question": example.question, "answer_prefix": example.answer_prefix,
                    "haystack": example.haystack, "length": example.length,
                    "requested_length": example.requested_length, "seed": example.seed,
                    "depth_lo": depth[0], "depth_hi": depth[1],
                    "needle_chars": np.asarray(example.needle_chars, np.int64).reshape(-1, 2),
                    "needle_tokens": np.asarray(example.needle_tokens, np.int64).reshape(-1, 2),
                    "context_chars": np.asarray(example.context_chars, np.int64),
                }


def default_data_dir() -> pathlib.Path:
    """<cache>/tfds (beside the corpora datasets)."""
    return cache_root() / "tfds"


def eval_set_builder(spec: EvalSetSpec, tokenizer=None, data_dir=None) -> TitansLongContext:
    """The builder of `spec` (not built yet); its config name carries the spec digest."""
    tokenizer = tokenizer or ByteTokenizer()
    fingerprint = getattr(tokenizer, "fingerprint", repr(tokenizer))
    config = EvalSetConfig(
        name=f"{spec.name}-{spec_digest(spec, fingerprint)}",
        version=TitansLongContext.VERSION,
        description=f"tasks {spec.tasks}, lengths {spec.lengths}, depths {spec.depths}, "
                    f"{spec.num_per_cell} per cell from seed {spec.seed}, tokenizer {fingerprint}",
        spec=spec, tokenizer=tokenizer)
    return TitansLongContext(config=config, data_dir=str(data_dir or default_data_dir()))


def build_eval_set(spec: EvalSetSpec, tokenizer=None, data_dir=None) -> TitansLongContext:
    """Build (or reuse) the array_record files of `spec`; returns the builder."""
    builder = eval_set_builder(spec, tokenizer, data_dir)
    # processes evaluating the same set at once take turns (tfds would race on its rename)
    with exclusive_lock(pathlib.Path(builder.data_dir).parent.parent / f".{builder.builder_config.name}.lock"):
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP))
    # a builder made before another process's build does not see its splits: make it again
    return eval_set_builder(spec, tokenizer, data_dir)


def load_eval_set(spec: EvalSetSpec, tokenizer=None, data_dir=None):
    """The built set as a random-access tfds data source (building it first if needed)."""
    return build_eval_set(spec, tokenizer, data_dir).as_data_source(split="test")


def examples_by_key(source) -> dict[str, dict]:
    """key -> example row (text fields as str) of a data source."""
    rows = {}
    for i in range(len(source)):
        row = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in source[i].items()}
        rows[row["key"]] = row
    return rows


__all__ = ["EvalSetConfig", "EvalSetSpec", "TitansLongContext", "build_eval_set",
           "default_data_dir", "eval_set_builder", "examples_by_key", "load_eval_set", "spec_digest"]
