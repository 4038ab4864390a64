"""Tokenizers (tokenizer.json, or rebuilt from GGUF metadata) and chat templates."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Mapping, Sequence

import numpy as np

CHATML_SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclasses.dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` with the ids and chat template a model needs."""

    tokenizer: object
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None  # the source template string, when known
    chat_format: str | None = None    # "chatml" | "llama3" | None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no BOS/EOS added; special-token strings in text are parsed)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        index = self.tokenizer.token_to_id(token)
        if index is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return index

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        if self.chat_format is None:
            raise ValueError("this tokenizer has no known chat format; pass chat_format="
                             "'chatml' or 'llama3'")
        return render_chat(messages, self.chat_format, add_generation_prompt,
                           default_system=CHATML_SMOLLM2_SYSTEM
                           if self.chat_template and "SmolLM" in self.chat_template else None)

    def chat_stop_ids(self) -> tuple[int, ...]:
        """Token ids that end an assistant turn in this chat format."""
        names = {"chatml": ("<|im_end|>",), "llama3": ("<|eot_id|>", "<|end_of_text|>")}
        ids = {self.tokenizer.token_to_id(n) for n in names.get(self.chat_format, ())}
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return tuple(sorted(i for i in ids if i is not None))


def detect_chat_format(template: str | None) -> str | None:
    if not template:
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    return None


def render_chat(messages: Sequence[Mapping[str, str]], chat_format: str,
                add_generation_prompt: bool = True, default_system: str | None = None) -> str:
    """Render messages [{"role", "content"}, ...] as ChatML or Llama 3 text.

    chatml: <|im_start|>{role}\\n{content}<|im_end|>\\n per message (default_system inserted
    first when the conversation has no system message, as SmolLM2's template does).
    llama3: <|begin_of_text|> then <|start_header_id|>{role}<|end_header_id|>\\n\\n
    {content stripped}<|eot_id|> per message (the Llama 3 Instruct template).
    """
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise ValueError(f"bad chat message {m!r}: need role system/user/assistant and content")
    if chat_format == "chatml":
        text = ""
        if default_system and (not messages or messages[0]["role"] != "system"):
            text += f"<|im_start|>system\n{default_system}<|im_end|>\n"
        for m in messages:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text
    if chat_format == "llama3":
        text = "<|begin_of_text|>"
        for m in messages:
            text += (f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                     f"{m['content'].strip()}<|eot_id|>")
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return text
    raise ValueError(f"unknown chat format {chat_format!r}; expected 'chatml' or 'llama3'")


def load_tokenizer(path: str | pathlib.Path) -> TextTokenizer:
    """From a tokenizer.json, a Hugging Face directory (tokenizer.json + tokenizer_config.json)
    or a .gguf file (rebuilt from its metadata)."""
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    directory = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    tok = Tokenizer.from_file(str(file))
    template, bos, eos, pad = None, None, None, None
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        cfg = json.loads(config_file.read_text())
        template = cfg.get("chat_template")

        def token_of(value):
            value = value.get("content") if isinstance(value, dict) else value
            return tok.token_to_id(value) if value else None

        bos, eos, pad = (token_of(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    return TextTokenizer(tok, bos, eos, pad, template, detect_chat_format(template))


def tokenizer_from_gguf(path_or_reader) -> TextTokenizer:
    """Rebuild a byte-level BPE tokenizer ("gpt2" GGUF tokenizer model) from GGUF metadata.

    Supported pre-tokenizers: "smollm" (digits split one by one, then GPT-2 byte-level
    regex) and "default"/"gpt2" (GPT-2 byte-level regex). Others raise NotImplementedError.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from t2_jax._loaders import _open_gguf  # a damaged file is named, not a numpy error

    reader = (path_or_reader if isinstance(path_or_reader, GGUFReader)
              else _open_gguf(pathlib.Path(path_or_reader)))

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' "
                                  "byte-level BPE)")
    pre = field("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2"):
        pre_tokenizer = byte_level
    else:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2)")
    tokens = list(field("tokenizer.ggml.tokens"))
    types = list(field("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched whole in text
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == 3]
    user_defined = [AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == 4]
    if control:
        tok.add_special_tokens(control)
    if user_defined:
        tok.add_tokens(user_defined)
    template = field("tokenizer.chat_template")
    return TextTokenizer(tok, field("tokenizer.ggml.bos_token_id"),
                         field("tokenizer.ggml.eos_token_id"),
                         field("tokenizer.ggml.padding_token_id"), template,
                         detect_chat_format(template))
