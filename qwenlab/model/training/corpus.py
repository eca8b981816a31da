"""Training text that ships with every machine: the Python standard library's .py files, tokenized.

Files sorted by path, each file's ids followed by <|endoftext|>; every `heldout_every`-th file goes to the
held-out stream and is never trained on. Test suites and installed packages are left out (distributions ship
or strip them differently; site-packages can sit inside the stdlib folder)."""
import hashlib
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenlab.errors import QwenlabError
from qwenlab.model.tokenizer import Tokenizer

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
END_OF_TEXT = "<|endoftext|>"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The .py files under the stdlib folder, sorted, without tests and installed packages."""
    root = Path(root) if root else stdlib_dir()
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])]
    if not files:
        raise QwenlabError(f"{root}: no standard-library .py files found to train on")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class Corpus:
    train: torch.Tensor  # int64 [N] token ids
    heldout: torch.Tensor  # int64 [M]
    facts: dict = field(default_factory=dict)


def _stream(tokenizer: Tokenizer, files: list[Path], eot: int) -> list[int]:
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    ids = []
    for enc in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids
        ids.append(eot)
    return ids


def _digest(ids: list[int]) -> str:
    return hashlib.sha256(torch.tensor(ids, dtype=torch.int32).numpy().tobytes()).hexdigest()[:16]


def build_corpus(tokenizer: Tokenizer, files: list[Path] | None = None, heldout_every: int = 50,
                 root: Path | None = None) -> Corpus:
    """`files` defaults to stdlib_files(root); file i is held out when i % heldout_every == heldout_every - 1
    (with fewer files than that, the last file is held out)."""
    root = Path(root) if root else stdlib_dir()
    files = stdlib_files(root) if files is None else list(files)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eot is None:
        raise QwenlabError(f"{tokenizer.source_dir}: tokenizer has no {END_OF_TEXT} token")
    every = min(heldout_every, len(files))
    if every < 2:
        raise QwenlabError(f"{len(files)} training file(s): need at least 2 (one is held out)")
    held = [p for i, p in enumerate(files) if i % every == every - 1]
    kept = [p for i, p in enumerate(files) if i % every != every - 1]
    train, heldout = _stream(tokenizer, kept, eot), _stream(tokenizer, held, eot)
    facts = {"source": "python stdlib .py files", "python": platform.python_version(), "root": str(root),
             "excluded_dirs": sorted(EXCLUDED_DIRS), "heldout_rule": f"file index % {every} == {every - 1}",
             "train_files": len(kept), "heldout_files": len(held), "train_tokens": len(train),
             "heldout_tokens": len(heldout), "end_of_text_id": eot, "train_sha256": _digest(train),
             "heldout_sha256": _digest(heldout), "first_heldout_file": _relative(held[0], root)}
    return Corpus(torch.tensor(train, dtype=torch.long), torch.tensor(heldout, dtype=torch.long), facts)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name
