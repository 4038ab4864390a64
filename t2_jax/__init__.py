"""Transformer² in JAX: Llama-family base models, loaders, generation, SVF experts, real
tasks with seeded disjoint pools, rewards (exact numbers; generated code run in a sandbox), the
option policy for multiple choice, and expert training (SVF by REINFORCE, the LoRA baseline)."""

from t2_jax._config import PRESETS, Llama3RopeScaling, LlamaConfig, get_config
from t2_jax._generate import (POISONED, Generation, continuation_logprobs, decode, decode_step,
                              generate, prefill, sample_token)
from t2_jax._loaders import (config_from_gguf, gguf_metadata, gguf_tensor_name,
                             hf_state_to_params, hf_tensor_shapes, load_gguf, load_hf,
                             params_to_hf_state, permute_qk_for_gguf, read_safetensors,
                             unpermute_qk_from_gguf)
from t2_jax._tokenizer import (TextTokenizer, detect_chat_format, load_tokenizer, render_chat,
                               tokenizer_from_gguf)
from t2_jax._svf import (ATTENTION_QV_RULE, DEFAULT_RULE, FORMS, ExpertMismatchError, Factors,
                         SVFForm, compose, compute_svd, factorise, fingerprint, flatten_paths,
                         get_form, init_expert, load_expert, mix_experts, save_expert,
                         select_paths, singular_value_scales, svd_cached, to_z, unflatten_paths,
                         z_form)
from t2_jax._sandbox import SandboxLimits, SandboxResult, SandboxUnavailableError, run_python
from t2_jax._tasks import TASKS, TaskExample, TaskSpec, load_task, split_pools
from t2_jax._rewards import code_reward, extract_code, extract_number, gold_number, numeric_reward
from t2_jax._options import (ChoiceBatch, encode_choices, option_loglik, option_loglik_reference,
                             option_policy, option_scores)
from t2_jax._experts import (Evaluator, ExpertConfig, apply_lora, batch_indices, load_lora, pools_for, train_expert,
                             wilson_interval)
from t2_jax._adapt import (STRATEGIES, CEMConfig, SelfAdaptiveModel, cem, classifier_examples,
                           few_shot_cem, parse_category)
from t2_jax._model import (Cache, Params, apply, apply_rope, attention, check_params,
                           default_positions, dense, init_cache, init_params, param_shapes,
                           rms_norm, rope_frequencies)

__all__ = [
    "PRESETS", "Llama3RopeScaling", "LlamaConfig", "get_config",
    "POISONED", "Generation", "continuation_logprobs", "decode", "decode_step", "generate",
    "prefill",
    "sample_token",
    "config_from_gguf", "gguf_metadata", "gguf_tensor_name", "hf_state_to_params",
    "hf_tensor_shapes", "load_gguf", "load_hf",
    "params_to_hf_state",
    "permute_qk_for_gguf", "read_safetensors", "unpermute_qk_from_gguf",
    "ATTENTION_QV_RULE", "DEFAULT_RULE", "FORMS", "ExpertMismatchError", "Factors", "SVFForm",
    "compose", "compute_svd", "factorise", "fingerprint", "flatten_paths", "get_form",
    "init_expert", "load_expert", "mix_experts", "save_expert", "select_paths",
    "singular_value_scales", "svd_cached", "to_z", "unflatten_paths", "z_form",
    "TextTokenizer", "detect_chat_format", "load_tokenizer", "render_chat", "tokenizer_from_gguf",
    "Cache", "Params", "apply", "apply_rope", "attention", "check_params", "default_positions",
    "dense", "init_cache", "init_params", "param_shapes", "rms_norm", "rope_frequencies",
    "SandboxLimits", "SandboxResult", "SandboxUnavailableError", "run_python",
    "TASKS", "TaskExample", "TaskSpec", "load_task", "split_pools",
    "code_reward", "extract_code", "extract_number", "gold_number", "numeric_reward",
    "ChoiceBatch", "encode_choices", "option_loglik", "option_loglik_reference", "option_policy",
    "option_scores",
    "Evaluator", "ExpertConfig", "apply_lora", "batch_indices", "load_lora", "pools_for", "train_expert", "wilson_interval",
    "STRATEGIES", "CEMConfig", "SelfAdaptiveModel", "cem", "classifier_examples", "few_shot_cem",
    "parse_category",
]
