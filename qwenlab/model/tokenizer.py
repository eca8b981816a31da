"""Qwen3 tokenizer from a checkpoint's tokenizer.json, chat template and byte-exact streaming decode.

Built on the `tokenizers` library and jinja2 only, so it is an independent path to compare
against HF transformers (see tests/test_tokenizer.py).
"""
from __future__ import annotations

import codecs
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as BackendTokenizer

from qwenlab.errors import QwenlabError
from qwenlab.model import chat_template
from qwenlab.model.config import read_json_object

DEFAULT_STOP_TOKENS = (("<|im_end|>", 151645), ("<|endoftext|>", 151643))
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@lru_cache(maxsize=1)
def byte_level_char_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + shifted)] = b
            shifted += 1
    return char_to_byte


def byte_level_token_bytes(token: str) -> bytes:
    """Bytes of a token as tokenizers' ByteLevel decoder sees them: unmapped chars mean the token is raw UTF-8."""
    table = byte_level_char_to_byte()
    if all(char in table for char in token):
        return bytes(table[char] for char in token)
    return token.encode("utf-8")


def load_backend(path: Path) -> BackendTokenizer:
    if not path.is_file():
        raise QwenlabError(f"tokenizer file not found: {path}")
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as exc:
        raise QwenlabError(f"cannot read tokenizer file {path}: {str(exc).splitlines()[0]}") from None


def read_json_or_empty(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def read_chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QwenlabError(f"cannot read {jinja_file}: {exc}") from None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def named_special_tokens(tokenizer_config: dict) -> dict[str, str]:
    found = {name: token_content(tokenizer_config.get(name)) for name in NAMED_SPECIAL_TOKENS}
    return {name: content for name, content in found.items() if content is not None}


def eos_ids_from_generation_config(generation_config: dict | None) -> tuple[int, ...]:
    eos = (generation_config or {}).get("eos_token_id")
    if eos is None:
        return ()
    ids = [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise QwenlabError(f'generation_config["eos_token_id"] must be an int or a list of ints, got {eos!r}')
    return tuple(ids)


def unique_in_order(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))


def template_ready_message(message: dict) -> dict:
    """Drop None-valued keys and copy reasoning under every name templates read, as transformers does."""
    cleaned = {key: value for key, value in message.items() if value is not None}
    reasoning = next((cleaned[key] for key in REASONING_FIELDS if key in cleaned), None)
    if reasoning is None:
        return cleaned
    return {"thinking": reasoning, **cleaned, "reasoning_content": reasoning}


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, source_dir: Path, tokenizer_config: dict,
                 chat_template: str | None, generation_config: dict | None = None):
        self.backend = backend
        self.source_dir = source_dir
        self.chat_template = chat_template
        self.special_tokens = named_special_tokens(tokenizer_config)
        added_tokens = backend.get_added_tokens_decoder()
        self.added_ids = frozenset(added_tokens)
        self.special_ids = frozenset(i for i, token in added_tokens.items() if token.special)
        self.stop_ids = unique_in_order(self.default_stop_ids() + eos_ids_from_generation_config(generation_config))

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path, generation_config: dict | None = None,
                 model_vocab_size: int | None = None) -> "Tokenizer":
        """model_vocab_size: the model's embedding rows (config.json's vocab_size); every id the tokenizer can
        produce must have one."""
        directory = Path(checkpoint_dir)
        backend = load_backend(directory / "tokenizer.json")
        config = read_json_or_empty(directory / "tokenizer_config.json")
        tokenizer = cls(backend, directory, config, read_chat_template(directory, config), generation_config)
        if model_vocab_size is not None and tokenizer.max_id >= model_vocab_size:
            raise QwenlabError(f"{directory / 'config.json'}: vocab_size={model_vocab_size}, but the tokenizer "
                               f"({directory / 'tokenizer.json'}) produces ids up to {tokenizer.max_id}: the "
                               "embedding has no row for them")
        return tokenizer

    @property
    def max_id(self) -> int:
        return max([self.backend.get_vocab_size(with_added_tokens=False) - 1, *self.added_ids])

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce, added tokens included (151669 for Qwen3; the model pads to 151936)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def default_stop_ids(self) -> tuple[int, ...]:
        looked_up = (self.backend.token_to_id(token) for token, _ in DEFAULT_STOP_TOKENS)
        return tuple(found if found is not None else fallback
                     for found, (_, fallback) in zip(looked_up, DEFAULT_STOP_TOKENS))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: bytes that were not UTF-8 (surrogateescape'd argv)
            code = ord(text[exc.start])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            raise QwenlabError(f"the text is not valid UTF-8 ({what} at character {exc.start})") from None
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise QwenlabError(f"token id {token_id} is outside the tokenizer's vocabulary (size {self.vocab_size})")
        if token_id in self.added_ids:
            return byte_level_token_bytes(token)
        return bytes(byte_level_char_to_byte()[char] for char in token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    enable_thinking: bool | None = None, tools: list[dict] | None = None) -> str:
        if self.chat_template is None:
            raise QwenlabError(f"no chat template in {self.source_dir} (chat_template.jinja or tokenizer_config.json)")
        variables = dict(self.special_tokens)
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return chat_template.render(
                self.chat_template, messages=[template_ready_message(m) for m in messages], tools=tools,
                documents=None, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as exc:  # noqa: BLE001 - the template is the user's code: any failure is theirs, one line
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise QwenlabError(f"chat template of {self.source_dir} failed: {type(exc).__name__}: {reason}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    enable_thinking: bool | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, enable_thinking))

    def stream(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Turns ids into text one at a time, holding back bytes of a UTF-8 character split across tokens.

    Concatenating every push() and flush() gives exactly Tokenizer.decode(ids); ids without a token
    are dropped, as decode drops them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self.tokenizer.id_to_token(token_id) is None:
            return ""
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        return self.utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)
