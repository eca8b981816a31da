"""Activation dumps: one .safetensors file, tensors under canonical names plus string metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from qwenlab.atomic import atomic_path
from qwenlab.errors import QwenlabError
from qwenlab.model.dtypes import dtype_name
from qwenlab.quant.writer import out_of_space
from qwenlab.versions import package_versions

JSON_KEYS = ("prompt_ids", "versions", "not_produced")
JSON_KEYS_MARKER = "json_keys"


@dataclass
class Dump:
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def prompt_ids(self) -> list[int] | None:
        return self.metadata.get("prompt_ids")

    @property
    def dtype(self) -> str | None:
        return self.metadata.get("dtype")


def library_versions() -> dict[str, str]:
    return package_versions(("torch", "safetensors"))


def encode_metadata(metadata: dict) -> dict[str, str]:
    """All values become strings; non-strings are JSON and listed under json_keys."""
    merged = {"producer": "qwenlab", "versions": library_versions(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    given = {k: _plain(v) for k, v in metadata.items() if v is not None}
    if isinstance(given.get("versions"), dict):
        given["versions"] = {**merged["versions"], **given["versions"]}
    merged.update(given)
    encoded, json_keys = {}, []
    for key, value in merged.items():
        if isinstance(value, str) and key not in JSON_KEYS:
            encoded[str(key)] = value
            continue
        try:
            encoded[str(key)] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise QwenlabError(f"dump metadata {key!r} cannot be stored as JSON ({exc})") from None
        json_keys.append(str(key))
    encoded[JSON_KEYS_MARKER] = json.dumps(json_keys)
    return encoded


def _plain(value):
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def decode_metadata(raw: dict[str, str] | None, path) -> dict:
    raw = dict(raw or {})
    marker = raw.pop(JSON_KEYS_MARKER, None)
    json_keys = set(JSON_KEYS)
    if marker is not None:
        listed = _loads(marker, JSON_KEYS_MARKER, path)
        if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
            raise QwenlabError(f"{path}: metadata {JSON_KEYS_MARKER!r} must be a JSON list of key names, "
                               f"got {marker!r}")
        json_keys |= set(listed)
    decoded = {key: _loads(value, key, path) if key in json_keys else value for key, value in raw.items()}
    ids = decoded.get("prompt_ids")
    if ids is not None and not (isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)):
        raise QwenlabError(f"{path}: metadata 'prompt_ids' must be a JSON list of token ids (ints >= 0), "
                           f"got {raw['prompt_ids'][:80]!r}")
    return decoded


def _loads(text: str, key: str, path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QwenlabError(f"{path}: metadata {key!r} is not valid JSON ({exc.msg})") from None


def _prepare(tensors: dict) -> dict[str, torch.Tensor]:
    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise QwenlabError(f"dump tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        prepared[str(name)] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return prepared


DUMP_KEYS = ("producer", "prompt_ids", JSON_KEYS_MARKER)  # metadata a dump has and a checkpoint's weights do not


def _is_dump(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return any(key in (handle.metadata() or {}) for key in DUMP_KEYS)
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not a dump
        return False


def check_output_path(path) -> Path:
    """Refuses, before any compute, a dump path that cannot be written: a directory, under a file or a folder this
    process may not write, or an existing file that is not a dump (a checkpoint's weights, a tokenizer file...)."""
    path = Path(path)
    if path.is_dir():
        raise QwenlabError(f"{path}: is a directory; give the dump's file name (e.g. {path / 'dump.safetensors'})")
    if path.exists() and not _is_dump(path):
        raise QwenlabError(f"{path}: exists and is not an activation dump (no {'/'.join(DUMP_KEYS)} metadata); "
                           "refusing to overwrite it")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not existing.is_dir() else "not writable"
        raise QwenlabError(f"{path}: cannot be written ({existing} is {why})")
    return path


def write_dump(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write atomically: a temp file in the same directory, then os.replace."""
    path = check_output_path(path)
    prepared = _prepare(tensors)
    encoded = encode_metadata(metadata or {})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(prepared, tmp, metadata=encoded)
    except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
        if not isinstance(exc, OSError) and not out_of_space(exc):
            raise
        raise QwenlabError(f"{path}: cannot be written ({getattr(exc, 'strerror', None) or exc})") from None
    return path


def _open(path: Path, read):
    if not path.is_file():
        raise QwenlabError(f"dump not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return read(handle)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QwenlabError(f"{path}: not a readable safetensors dump ({reason})") from None


def read_metadata(path) -> dict:
    """The decoded metadata alone (no tensor is read)."""
    path = Path(path)
    return decode_metadata(_open(path, lambda handle: handle.metadata()), path)


def check_tensors(tensors: dict, path):
    """Dump tensors are activations, token-major: at least one dimension."""
    for name, tensor in tensors.items():
        if tensor.dim() == 0:
            raise QwenlabError(f"{path}: tensor {name!r} is 0-dimensional; dump tensors are [tokens, ...] "
                               "activations (doc/dump-format.md)")


def read_dump(path) -> Dump:
    path = Path(path)
    raw, tensors = _open(path, lambda handle: (handle.metadata(), {name: handle.get_tensor(name)
                                                                   for name in handle.keys()}))
    check_tensors(tensors, path)
    return Dump(tensors=tensors, metadata=decode_metadata(raw, path), path=path)
