"""Few-shot self-adaptation (Transformer² §3.2, strategy 3): the Cross-Entropy Method searches
mixing weights alpha for K trained SVF experts, z' = sum_k alpha_k z_k, to maximise accuracy on
a few examples of a new task; the second pass then answers with W'(z').

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
