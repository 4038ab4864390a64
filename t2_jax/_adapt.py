"""Self-adaptation in two passes (Transformer² §3.2): a first pass decides a mix of trained SVF
experts for the prompt or task, the second answers with the adapted weights W'(z'),
z' = sum_k alpha_k z_k. `SelfAdaptiveModel.adapt_and_generate(examples, strategy)` runs both:

  "prompt"      the base model classifies the question from a fixed format (CLASSIFY_TEMPLATE);
                "other" (or no category named) means the base weights, not the last expert used
                (the released code's defect)
  "classifier"  a classification expert (an SVF expert trained with the same REINFORCE loop on
                classifier_examples, built from the families' train / validation pools only)
                picks the family with the option policy
  "few_shot"    the Cross-Entropy Method below searches alpha on a few examples of the task
  "base" / "expert"  no adaptation / one named expert (references)

Few-shot CEM: the Cross-Entropy Method searches mixing weights alpha for K trained SVF experts to
maximise accuracy on a few examples of a new task (never its test items).

Released settings (docs/t2.md §3) as defaults: population 32, elite ratio 0.2, 50 generations,
alpha ~ N(mean, std) clamped to [0, 1], mean initialised to 1/K and std to 0.5, the best alpha
so far re-entered as member 0 of every later generation; fitness = accuracy on the shots, ties
broken by the mean log-likelihood of the correct answers. alpha is one weight per expert, or one
per expert per adapted matrix (per_matrix). Mixing is over z (after the sigmoid for released-form
experts: t2_jax.mix_experts), not over the logits as the released code does, so a one-hot alpha
reproduces that expert exactly.

The population is scored as one batched program: `option_fitness` vmaps the mix, the adapted
(factorised) model and the option scoring over the P members; the base weights are shared.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t2_jax import _options
from t2_jax._config import LlamaConfig
from t2_jax._model import Params
from t2_jax._svf import factorise, flatten_paths, get_form, mix_experts, unflatten_paths, z_form


@dataclasses.dataclass(frozen=True)
class CEMConfig:
    population: int = 32
    elite_ratio: float = 0.2
    generations: int = 50
    init_std: float = 0.5
    low: float = 0.0
    high: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.population < 2 or self.generations < 1:
            raise ValueError(f"need population >= 2 and generations >= 1, got {self.population}, "
                             f"{self.generations}")
        if not 0 < self.elite_ratio <= 1:
            raise ValueError(f"elite_ratio must lie in (0, 1], got {self.elite_ratio}")
        if not self.low < self.high or self.init_std <= 0:
            raise ValueError("need low < high and init_std > 0")

    @property
    def elites(self) -> int:
        return max(1, math.ceil(self.elite_ratio * self.population))


class CEMResult(NamedTuple):
    alpha: np.ndarray          # (D,) the best member seen
    fitness: tuple[float, float]
    history: list[dict]        # per generation: best, elite mean and population mean fitness, std


def _order(scores: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Indices from best to worst: by score, then tie-break, then index (stable)."""
    return np.lexsort((np.arange(len(scores)), -ties, -scores))


def cem(fitness: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], dim: int,
        config: CEMConfig = CEMConfig(), init_mean: np.ndarray | None = None) -> CEMResult:
    """Maximise fitness over alpha in [low, high]^dim. fitness(population (P, dim)) returns
    (scores (P,), tie-breaks (P,)); higher is better. Returns the best member ever evaluated."""
    if dim < 1:
        raise ValueError("cem needs at least one dimension")
    rng = np.random.default_rng([config.seed, 0xCE])
    mean = np.full(dim, 1.0 / dim) if init_mean is None else np.asarray(init_mean, np.float64)
    if mean.shape != (dim,):
        raise ValueError(f"init_mean must have shape ({dim},), got {mean.shape}")
    std = np.full(dim, config.init_std)
    best, best_fit, history = None, (-np.inf, -np.inf), []
    for generation in range(config.generations):
        population = np.clip(mean + std * rng.standard_normal((config.population, dim)), config.low, config.high)
        if best is not None:
            population[0] = best  # best so far kept (released)
        scores, ties = (np.asarray(x, np.float64) for x in fitness(population))
        if scores.shape != (config.population,) or ties.shape != (config.population,):
            raise ValueError(f"fitness must return two ({config.population},) arrays, got {scores.shape}, "
                             f"{ties.shape}")
        order = _order(scores, ties)
        top = order[0]
        if (scores[top], ties[top]) > best_fit:
            best, best_fit = population[top].copy(), (float(scores[top]), float(ties[top]))
        elite = population[order[:config.elites]]
        mean, std = elite.mean(0), elite.std(0)
        history.append({"generation": generation, "best": best_fit[0], "best_tie": best_fit[1],
                        "elite_mean": float(scores[order[:config.elites]].mean()),
                        "population_mean": float(scores.mean()), "std": float(std.mean())})
    return CEMResult(best, best_fit, history)


# ---- alpha <-> expert mixes ---------------------------------------------------------------------


def alpha_layout(expert, num_experts: int, per_matrix: bool) -> list[tuple[str, int]]:
    """The flat alpha vector's layout: [(matrix path or "*", K)]: K weights shared by every
    matrix, or K per adapted matrix (per_matrix)."""
    if not per_matrix:
        return [("*", num_experts)]
    return [(path, num_experts) for path in flatten_paths(expert)]


def alpha_tree(alpha: jax.Array, experts: Sequence[Any], per_matrix: bool):
    """The flat alpha (D,) as mix_experts' alpha: (K,) or a per-matrix pytree of (K,) leaves."""
    K = len(experts)
    if not per_matrix:
        return alpha.reshape(K)
    paths = list(flatten_paths(experts[0]))
    return unflatten_paths({path: alpha[i * K:(i + 1) * K] for i, path in enumerate(paths)})


def mixed_params(params: Params, svd, experts: Sequence[Any], alpha, form: str, per_matrix: bool = False) -> Params:
    """The base with every adapted kernel factorised at z' = sum_k alpha_k z_k (traceable)."""
    z = mix_experts(experts, alpha_tree(jnp.asarray(alpha, jnp.float32), experts, per_matrix), form)
    return factorise(params, svd, z, z_form(form))


@functools.partial(jax.jit, static_argnames=("model_config", "form", "per_matrix", "normalisation"))
def option_fitness(alphas, params: Params, svd, experts, arrays, *, model_config: LlamaConfig, form: str,
                   per_matrix: bool = False, normalisation: str = "token"):
    """(accuracy (P,), mean log-likelihood of the correct options (P,)) of each alpha (P, D) on a
    batch of multiple-choice shots (t2_jax._experts' choice arrays); one batched program."""

    def one(alpha):
        adapted = mixed_params(params, svd, experts, alpha, form, per_matrix)
        loglik = _options.option_loglik(adapted, model_config, arrays["prompt"], arrays["prompt_mask"],
                                        arrays["options"], arrays["option_mask"])
        scores = _options.normalise(loglik, arrays["option_mask"], arrays["valid"], arrays["chars"], normalisation)
        accuracy = jnp.mean(jnp.argmax(scores, -1) == arrays["gold"])
        gold_loglik = jnp.take_along_axis(loglik, arrays["gold"][:, None], -1)[:, 0]
        return accuracy, jnp.mean(gold_loglik)

    return jax.vmap(one)(alphas)


def few_shot_cem(params: Params, model_config: LlamaConfig, svd, experts: Sequence[Any], shots: Sequence,
                 tokenizer, *, form: str = "released", per_matrix: bool = False, normalisation: str = "token",
                 config: CEMConfig = CEMConfig()) -> CEMResult:
    """CEM over mixing weights on a few multiple-choice shots (never the test items: the caller
    draws them from a validation pool)."""
    from t2_jax._experts import _choice_arrays, _pad

    if not experts:
        raise ValueError("few_shot_cem needs at least one expert")
    get_form(form)
    arrays = _choice_arrays(_options.encode_choices(tokenizer, shots, pad_id=_pad(tokenizer)))
    dim = sum(k for _, k in alpha_layout(experts[0], len(experts), per_matrix))

    def fitness(population):
        accuracy, tie = option_fitness(jnp.asarray(population, jnp.float32), params, svd, list(experts), arrays,
                                       model_config=model_config, form=form, per_matrix=per_matrix,
                                       normalisation=normalisation)
        return np.asarray(accuracy), np.asarray(tie)

    return cem(fitness, dim, config)


# ---- the two passes ---------------------------------------------------------------------------------

STRATEGIES = ("base", "prompt", "classifier", "few_shot", "expert")
OTHER = "other"
CLASSIFY_TEMPLATE = ("Analyze the given question and classify it into one of these categories: {names}. "
                     "If it fits none of them, answer \"{other}\". Reply with the category name only.\n\n"
                     "Question: {question}\n\nCategory:")
CLASSIFIER_PROMPT = "Question: {question}\nThe question is about"


def parse_category(text: str, names: Sequence[str]) -> str:
    """The category a first-pass answer names: the content of a final \\boxed{...} if any, else the
    earliest name mentioned (case-insensitive, whole words); OTHER when none is."""
    import re

    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    candidates = boxed[-1:] if boxed else [text]
    for candidate in candidates:
        hits = [(m.start(), name) for name in names
                for m in [re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", candidate, re.I)] if m]
        if hits:
            return min(hits)[1]
    return OTHER


def classifier_examples(pools_by_family: dict[str, Sequence], pool: str = "train") -> list:
    """Multiple-choice examples that teach a classification expert to name a question's family:
    prompt CLASSIFIER_PROMPT(question), options = the family names, gold = its family. Built only
    from the families' `pool` pools (train / validation), so test items never reach it."""
    from t2_jax._tasks import TaskExample

    if pool == "test":
        raise ValueError("classification-expert data must not come from test pools")
    names = tuple(sorted(pools_by_family))
    out = []
    for family in names:
        for example in pools_by_family[family][pool]:
            out.append(TaskExample(task="classifier", id=f"{family}/{example.id}", kind="choice",
                                   question=example.question, prompt=CLASSIFIER_PROMPT.format(question=example.question),
                                   choices=names, gold=names.index(family), target=family,
                                   content_key=f"{family}/{example.content_key or example.id}"))
    return out


@dataclasses.dataclass
class SelfAdaptiveModel:
    """A base model with named SVF experts (all of one form and selection rule, trained on this
    base) that answers in two passes: the first decides a mix of experts for the prompt (or the
    task), the second answers with W'(z'). Composed (factorised) weights are cached per mix.

    strategies: "base" (no adaptation), "expert" (a given expert: `expert=` name), "prompt" (the
    model classifies the prompt itself from a fixed format; "other" -> the base weights),
    "classifier" (a classification expert picks the family), "few_shot" (CEM over mixing weights
    on a few examples of the task, one mix for the whole task)."""

    params: Params
    model_config: LlamaConfig
    tokenizer: Any
    experts: dict
    form: str = "released"
    svd: Any = None
    classifier: Any = None          # an SVF expert trained on classifier_examples (same rule)
    normalisation: str = "token"
    eval_batch: int = 16
    _cache: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.experts:
            raise ValueError("SelfAdaptiveModel needs at least one expert")
        if OTHER in self.experts:
            raise ValueError(f"{OTHER!r} is reserved for 'no expert' (the base weights)")
        get_form(self.form)
        if self.svd is None:
            raise ValueError("SelfAdaptiveModel needs the base model's SVD (t2_jax.svd_cached(params, rule))")
        for name, expert in self.experts.items():
            paths = sorted(flatten_paths(expert))
            if paths != sorted(self.svd):
                raise ValueError(f"expert {name!r} adapts {paths[:2]}..., the SVD covers {sorted(self.svd)[:2]}...: "
                                 "the experts and the SVD must come from one selection rule")
        self.names = tuple(self.experts)

    @classmethod
    def from_files(cls, params: Params, model_config: LlamaConfig, tokenizer, paths: dict, *,
                   classifier_path=None, svd_cache=None, **options) -> "SelfAdaptiveModel":
        """Experts read from t2_jax expert files ({name: path}); each must record this base model's
        fingerprint (t2_jax.ExpertMismatchError otherwise) and all one form and rule."""
        from t2_jax._svf import load_expert, svd_cached

        if not paths:
            raise ValueError("from_files needs at least one expert file")
        experts, metas = {}, {}
        for name, path in paths.items():
            experts[name], metas[name] = load_expert(path, params=params)
        forms = {m.get("form") for m in metas.values()}
        rules = {m.get("rule") for m in metas.values()}
        if len(forms) != 1 or len(rules) != 1:
            raise ValueError(f"the experts mix forms {sorted(map(str, forms))} or rules {sorted(map(str, rules))}")
        form, rule = forms.pop(), rules.pop()
        classifier = None
        if classifier_path is not None:
            classifier, meta = load_expert(classifier_path, params=params)
            if (meta.get("form"), meta.get("rule")) != (form, rule):
                raise ValueError("the classification expert has another form or rule than the experts")
        return cls(params, model_config, tokenizer, experts, form=form, svd=svd_cached(params, rule, svd_cache),
                   classifier=classifier, **options)

    # weights -----------------------------------------------------------------------------------
    def weights_for(self, alpha: tuple[float, ...] | None) -> Params:
        """Adapted parameters for a mix (alpha over self.names), cached; None = the base itself."""
        if alpha is None:
            return self.params
        key = tuple(float(a) for a in alpha)
        if len(key) != len(self.names):
            raise ValueError(f"a mix needs {len(self.names)} weights, got {len(key)}")
        if key not in self._cache:
            self._cache[key] = mixed_params(self.params, self.svd, [self.experts[n] for n in self.names],
                                            jnp.asarray(key, jnp.float32), self.form)
        return self._cache[key]

    def one_hot(self, name: str) -> tuple[float, ...]:
        if name not in self.names:
            raise ValueError(f"unknown expert {name!r}; the experts are {list(self.names)}")
        return tuple(1.0 if n == name else 0.0 for n in self.names)

    # first pass --------------------------------------------------------------------------------
    def classify_by_prompt(self, examples: Sequence, max_new_tokens: int = 12) -> list[str]:
        """The base model names each question's category (greedy, fixed format); OTHER if none."""
        from t2_jax._experts import _left_pad, _pad
        from t2_jax._generate import generate

        names = list(self.names)
        texts = [CLASSIFY_TEMPLATE.format(names=", ".join(names), other=OTHER, question=e.question) for e in examples]
        if getattr(self.tokenizer, "chat_format", None):
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        stops = self.tokenizer.chat_stop_ids() if hasattr(self.tokenizer, "chat_stop_ids") else ()
        out = []
        for begin in range(0, len(texts), self.eval_batch):
            prompt, mask = _left_pad([self.tokenizer.encode(t) for t in texts[begin:begin + self.eval_batch]],
                                     _pad(self.tokenizer))
            gen = generate(self.params, self.model_config, prompt, mask, max_new_tokens=max_new_tokens,
                           stop_tokens=stops, pad_id=_pad(self.tokenizer))
            tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
            out += [parse_category(self.tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True), names)
                    for i in range(len(tokens))]
        return out

    def classify_by_expert(self, examples: Sequence) -> list[str]:
        """The classification expert's choice among the family names (option policy argmax)."""
        from t2_jax._experts import Evaluator  # noqa: F401 - same scoring path as evaluation
        from t2_jax._svf import factorise as fact

        if self.classifier is None:
            raise ValueError("the 'classifier' strategy needs a classification expert (classifier=...)")
        names = tuple(sorted(self.names))
        weights = fact(self.params, self.svd, self.classifier, self.form)
        out = []
        for begin in range(0, len(examples), self.eval_batch):
            chunk = [dataclasses.replace(e, kind="choice", prompt=CLASSIFIER_PROMPT.format(question=e.question),
                                         choices=names, gold=0, answer="", tests="")
                     for e in examples[begin:begin + self.eval_batch]]
            scores = _options.option_scores(weights, self.model_config,
                                            _options.encode_choices(self.tokenizer, chunk), self.normalisation)
            out += [names[i] for i in np.asarray(jnp.argmax(scores, -1))]
        return out

    def first_pass(self, examples: Sequence, strategy: str, *, expert: str | None = None, shots: Sequence = (),
                   cem_config: CEMConfig = CEMConfig()) -> tuple[list, dict]:
        """The mix (alpha tuple, or None for the base) of each example, and what the pass decided."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        if strategy == "base":
            return [None] * len(examples), {}
        if strategy == "expert":
            if expert is None:
                raise ValueError("the 'expert' strategy needs expert=<name>")
            return [self.one_hot(expert)] * len(examples), {"expert": expert}
        if strategy in ("prompt", "classifier"):
            labels = self.classify_by_prompt(examples) if strategy == "prompt" else self.classify_by_expert(examples)
            return [None if label == OTHER else self.one_hot(label) for label in labels], {"labels": labels}
        if not shots:
            raise ValueError("the 'few_shot' strategy needs shots (a few examples of the task, never its test items)")
        result = few_shot_cem(self.params, self.model_config, self.svd, [self.experts[n] for n in self.names], shots,
                              self.tokenizer, form=self.form, normalisation=self.normalisation, config=cem_config)
        alpha = tuple(float(a) for a in result.alpha)
        return [alpha] * len(examples), {"alpha": alpha, "fitness": result.fitness, "history": result.history}

    # second pass -------------------------------------------------------------------------------
    def second_pass(self, examples: Sequence, mixes: Sequence, max_new_tokens: int = 256) -> list:
        """Answers with each example's adapted weights (examples sharing a mix run together): the
        chosen option index for multiple choice, the generated text otherwise."""
        from t2_jax._experts import _left_pad, _pad
        from t2_jax._generate import generate

        answers: list = [None] * len(examples)
        groups: dict = {}
        for i, mix in enumerate(mixes):
            groups.setdefault(mix, []).append(i)
        for mix, indices in groups.items():
            weights = self.weights_for(mix)
            for begin in range(0, len(indices), self.eval_batch):
                chunk_ids = indices[begin:begin + self.eval_batch]
                chunk = [examples[i] for i in chunk_ids]
                if chunk[0].kind == "choice":
                    scores = _options.option_scores(weights, self.model_config,
                                                    _options.encode_choices(self.tokenizer, chunk), self.normalisation)
                    for i, choice in zip(chunk_ids, np.asarray(jnp.argmax(scores, -1))):
                        answers[i] = int(choice)
                else:
                    prompt, mask = _left_pad([self.tokenizer.encode(e.prompt) for e in chunk], _pad(self.tokenizer))
                    stops = self.tokenizer.chat_stop_ids() if hasattr(self.tokenizer, "chat_stop_ids") else ()
                    gen = generate(weights, self.model_config, prompt, mask, max_new_tokens=max_new_tokens,
                                   stop_tokens=stops, pad_id=_pad(self.tokenizer))
                    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
                    for j, i in enumerate(chunk_ids):
                        answers[i] = self.tokenizer.decode(tokens[j, :lengths[j]], skip_special_tokens=True)
        return answers

    def adapt_and_generate(self, examples: Sequence, strategy: str, **first_pass_options) -> dict:
        """Both passes: {"answers", "mixes", "decision", "first_pass_s", "second_pass_s"}."""
        import time

        if not examples:
            raise ValueError("adapt_and_generate needs at least one example")
        start = time.perf_counter()
        mixes, decision = self.first_pass(examples, strategy, **first_pass_options)
        middle = time.perf_counter()
        answers = self.second_pass(examples, mixes)
        return {"answers": answers, "mixes": mixes, "decision": decision, "first_pass_s": middle - start,
                "second_pass_s": time.perf_counter() - middle}
