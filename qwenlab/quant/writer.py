"""Writing a checkpoint folder in HF layout: config.json, the quant config files, safetensors (sharded with an index
when larger than max_shard_bytes) and every other file of the source (tokenizer, generation config, chat template).
Written into a temp folder beside DST and renamed at the end: a failed run leaves no half-written DST. A disk
without room for the tensors is said before writing (and a write that runs out of room anyway says the same), in
one line naming the folder."""
import errno
import json
import shutil
import sys
from contextlib import contextmanager
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


def no_room(dst: Path, need: int, free: int) -> QwenlabError:
    return QwenlabError(f"{dst}: not enough disk space to write this checkpoint ({need / 1e9:.1f} GB of tensors, "
                        f"{free / 1e9:.1f} GB free in {dst.parent}); free some, or write it elsewhere (a temp folder "
                        "follows TMPDIR)")


def free_bytes(dst: Path) -> int:
    """Free bytes on the disk dst would be written to (its nearest existing folder: nothing is created to ask)."""
    folder = dst.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def out_of_space(e: BaseException) -> bool:
    """An OSError ENOSPC, or safetensors' error for one (it wraps the I/O error in its own class)."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)


@contextmanager
def room_for(dst: Path, need: int):
    """Around writing `need` bytes of tensors to checkpoint folder dst: refuses first when its disk has less (plus
    1%) free, and a write that runs out of room anyway (the estimate, another writer) says the same in one line."""
    free = free_bytes(dst)
    if free < need * 1.01:
        raise no_room(dst, need, free)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless the disk filled up
        if out_of_space(e):
            raise no_room(dst, need, free_bytes(dst)) from None
        raise


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


def copy_side_files(src: Path, dst: Path, may_read=None) -> set[str]:
    """Every regular file of src except weights and the files the writer produces itself, with its permissions.
    A symlink is followed only when may_read(path) says its target may be read (inside src); else one warning line
    and the file is skipped. -> the names copied."""
    copied = set()
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name in REWRITTEN or path.name.endswith(WEIGHT_SUFFIXES):
            continue
        if path.is_symlink() and may_read is not None and not may_read(path):
            print(f"warning: {path.name} not copied: it links to {path.resolve()}, outside {src}", file=sys.stderr)
            continue
        shutil.copyfile(path, dst / path.name)
        shutil.copymode(path, dst / path.name)
        copied.add(path.name)
    return copied


def write_checkpoint(dst, src_dir, config: dict, tensors: dict[str, torch.Tensor], extra_json: dict | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, may_read=None) -> Path:
    """Copied files keep their permissions; written ones (config, weights) take those of src's config.json, the
    folder those of src."""
    dst, src_dir = Path(dst), Path(src_dir)
    check_destination(dst)
    written_mode = (src_dir / "config.json").stat().st_mode & 0o666
    with room_for(dst, sum(nbytes(t) for t in tensors.values())), \
            atomic_dir(dst, mode=src_dir.stat().st_mode & 0o777) as tmp:
        copied = copy_side_files(src_dir, tmp, may_read)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        _write_weights(tmp, {k: v.contiguous() for k, v in tensors.items()}, max_shard_bytes)
        for path in tmp.iterdir():
            if path.name not in copied:
                path.chmod(written_mode)
    return dst
