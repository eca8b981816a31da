"""A checkpoint folder's weight files: which file holds each tensor, read only from inside the folder, and the whole
checkpoint checked before any compute (headers, file lengths, tensors the config does not explain, NaN/inf).

Containment: an index entry must be a plain file name, and a weight file (or the index) that is a symlink is followed
only to a target inside the folder, or, for a Hugging Face cache snapshot (<cache>/models--org--name/snapshots/<rev>,
whose files link to ../../blobs/<hash>), inside the blob store of the same repository.
"""
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwenlab.errors import QwenlabError
from qwenlab.model.config import Qwen3Config

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}  # the floating dtypes
CHUNK_BYTES = 64 * 2**20  # the finiteness check reads this much of a tensor at a time
LAYER = re.compile(r"model\.layers\.(\d+)\.")


def allowed_roots(checkpoint_dir) -> list[Path]:
    """Where the folder's files may live: the folder itself and, for an HF cache snapshot, its repository's blobs."""
    folder = Path(checkpoint_dir).resolve()
    roots = [folder]
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        roots.append(folder.parent.parent / "blobs")
    return roots


def is_inside(path, checkpoint_dir) -> bool:
    target = Path(path).resolve()
    return any(target == root or target.is_relative_to(root) for root in allowed_roots(checkpoint_dir))


def contained(path: Path, checkpoint_dir: Path) -> Path:
    """path (a file of the folder, perhaps a symlink) when it resolves inside the allowed roots; else one line."""
    if not is_inside(path, checkpoint_dir):
        raise QwenlabError(f"{path}: links to {path.resolve()}, outside the checkpoint folder {checkpoint_dir} "
                           "(weights are read only from inside it, or from the HF cache blobs of the same repository)")
    return path


def refuse_inside(out, checkpoint_dir, flag: str = "--out"):
    """An output path inside a checkpoint folder that is read (or the blobs it links to) is refused before anything
    is loaded or written: writing there could overwrite the checkpoint."""
    if is_inside(out, checkpoint_dir):
        raise QwenlabError(f"{flag} {out}: is inside the checkpoint folder {checkpoint_dir}, which is read; "
                           "write it elsewhere (nothing was written)")


def _shard_name(name, index: Path) -> str:
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name \
            or "\0" in name:
        raise QwenlabError(f"{index}: weight_map entry {name!r} is not a plain file name in the checkpoint folder "
                           "(no folders, '..' or absolute paths)")
    return name


def _weight_map(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise QwenlabError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise QwenlabError(f"{index}: weight_map must be an object (tensor name -> file name)")
    return weight_map


def weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (sharded via the index, or one model.safetensors). A folder
    with both is refused: transformers reads model.safetensors, an index names other files, and a diff of the two
    would compare different weights."""
    checkpoint_dir = Path(checkpoint_dir)
    index, single = checkpoint_dir / INDEX, checkpoint_dir / SINGLE
    if index.is_file() and single.is_file():
        raise QwenlabError(f"{checkpoint_dir}: holds both {SINGLE} and {INDEX}, two weight sources (transformers "
                           f"reads {SINGLE}): remove {SINGLE}, or the index and its shards")
    if index.is_file():
        files = {}
        for name, shard in _weight_map(contained(index, checkpoint_dir)).items():
            files[name] = checkpoint_dir / _shard_name(shard, index)
        for path in set(files.values()):
            contained(path, checkpoint_dir)
        return files
    if single.is_file():
        return {name: single for name in header(contained(single, checkpoint_dir))}
    if list(checkpoint_dir.glob("*.bin")) or list(checkpoint_dir.glob("*.pt")):
        raise QwenlabError(f"{checkpoint_dir}: only pickle weights (.bin/.pt) found; qwenlab loads safetensors only, "
                           "because unpickling a checkpoint can run arbitrary code (convert it to safetensors first)")
    raise QwenlabError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json")


def header(path: Path) -> dict[str, tuple]:
    """name -> shape, read from the header only; a truncated or corrupt file fails here, before any compute."""
    if not path.is_file():
        raise QwenlabError(f"{path}: weight file listed in the index is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise QwenlabError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    check_size(path)
    return shapes


def check_size(path: Path):
    """safetensors maps lazily, so a file cut short only fails at the first read: check its length up front."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size < 8 + n + end:
        raise QwenlabError(f"{path}: truncated ({path.stat().st_size} bytes, header promises {8 + n + end})")


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple]:
    """name -> shape over every file; each file must hold exactly the names the index gives it."""
    shapes = {}
    for path in sorted(set(files.values())):
        held = header(path)
        listed = {name for name, p in files.items() if p == path}
        stray = sorted(set(held) - listed) or sorted(listed - set(held))
        if stray:
            where = "the index does not list it there" if stray[0] in held else "the index says it is there"
            raise QwenlabError(f"{path}: {'holds' if stray[0] in held else 'lacks'} tensor {stray[0]}, but {where}")
        shapes |= held
    return shapes


def natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def unexplained(names, explained: set[str], cfg: Qwen3Config) -> list[str]:
    """Tensor names the config does not account for, in natural order. A tied model's stored lm_head.weight is
    accounted for (transformers ties it to the embedding; qwenlab does not read it)."""
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    return sorted((n for n in names if n not in explained and n not in tied), key=natural_key)


def unexplained_message(checkpoint_dir, unknown: list[str], cfg: Qwen3Config) -> str:
    name, more = unknown[0], len(unknown) - 1
    layer = LAYER.match(name)
    if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
        why = f"belongs to layer {layer.group(1)}, but config.json says num_hidden_layers={cfg.num_hidden_layers}"
    else:
        why = "is not a tensor of a Qwen3 with this config.json"
    others = f" ({more} more like it)" if more else ""
    return (f"{checkpoint_dir}: tensor {name} {why}{others}; refusing to ignore it "
            "(--allow-unknown-tensors / allow_unknown=True loads without them)")


def first_nonfinite(chunk: torch.Tensor) -> tuple[str, list[int]] | None:
    """(value, index) of the first NaN/inf of a floating tensor on any device, None when all are finite."""
    if chunk.numel() == 0:
        return None
    if chunk.dtype.itemsize == 1:  # float8: no isfinite kernel; every e4m3/e5m2 value fits float16
        chunk = chunk.to(torch.float16)
    low, high = torch.aminmax(chunk)  # NaN propagates into both; one pass, faster than isfinite().all()
    if torch.isfinite(low) and torch.isfinite(high):
        return None
    bad = (~torch.isfinite(chunk)).nonzero()
    if not len(bad):
        return None
    at = bad[0].tolist()
    return str(chunk[tuple(at)].item()), at


def _chunks(f, name: str):
    """(first row, tensor) pieces of about CHUNK_BYTES of a floating tensor; nothing for other dtypes."""
    part = f.get_slice(name)
    dtype, shape = part.get_dtype(), part.get_shape()
    if dtype not in ITEMSIZE:
        return
    if not shape:
        yield 0, f.get_tensor(name).reshape(1)
        return
    rows = max(1, CHUNK_BYTES // max(1, math.prod(shape[1:]) * ITEMSIZE[dtype]))
    for start in range(0, shape[0], rows):
        yield start, part[start:start + rows]


def _check_tensor(f, name: str, path: Path):
    for start, chunk in _chunks(f, name):
        found = first_nonfinite(chunk)
        if found:
            value, at = found
            at = [at[0] + start, *at[1:]]
            raise QwenlabError(f"{path}: {name}: holds NaN or infinite values (first: {value} at {at}); "
                               "the checkpoint is corrupt")


def check_finite(files: dict[str, Path]):
    """Every floating tensor (weights and scales, float8 included) is read in chunks of about CHUNK_BYTES and must
    hold no NaN or inf; the first bad one is named with the index of its first bad value."""
    by_file = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path in sorted(by_file):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in sorted(by_file[path], key=natural_key):
                    _check_tensor(f, name, path)
        except (SafetensorError, OSError) as e:
            raise QwenlabError(f"{path}: cannot be read ({str(e).splitlines()[0]})") from None


def check_checkpoint(checkpoint_dir, files: dict[str, Path], explained: set[str], cfg: Qwen3Config,
                     allow_unknown: bool = False):
    """After the shape checks: tensors the config does not explain are refused (unless allow_unknown: they are
    then not read), and every tensor that will be read must be finite."""
    unknown = unexplained(files, explained, cfg)
    if unknown and not allow_unknown:
        raise QwenlabError(unexplained_message(checkpoint_dir, unknown, cfg))
    check_finite({name: path for name, path in files.items() if name not in unknown})
