"""Writing a checkpoint folder in HF layout: config.json, the quant config files, safetensors (sharded with an index
when larger than max_shard_bytes) and every other file of the source (tokenizer, generation config, chat template).
Written into a temp folder beside DST and renamed at the end: a failed run leaves no half-written DST."""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenlab.atomic import atomic_dir
from qwenlab.errors import QwenlabError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
REWRITTEN = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")
DEFAULT_SHARD_BYTES = 2 * 2**30


def check_destination(dst: Path):
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise QwenlabError(f"{dst}: exists and is not empty (refusing to overwrite)")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups in the given order, each at most max_shard_bytes (a larger tensor gets its own)."""
    out, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + nbytes(t) > max_shard_bytes:
            out.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes(t)
    return out + [current] if current else out


def _write_weights(folder: Path, tensors: dict, max_shard_bytes: int):
    parts = shards(tensors, max_shard_bytes)
    if len(parts) == 1:
        save_file(parts[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path):
    """Every regular file of src except weights and the files the writer produces itself."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in REWRITTEN and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(path, dst / path.name)


def write_checkpoint(dst, src_dir, config: dict, tensors: dict[str, torch.Tensor], extra_json: dict | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    dst = Path(dst)
    check_destination(dst)
    with atomic_dir(dst) as tmp:
        copy_side_files(Path(src_dir), tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        _write_weights(tmp, {k: v.contiguous() for k, v in tensors.items()}, max_shard_bytes)
        for path in tmp.iterdir():
            path.chmod(0o644)
    return dst
