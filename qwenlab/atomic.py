"""Atomic file writes: a temp file beside the target, then os.replace, so nothing the user has is left
half-written or overwritten on failure. JSON is written strict: NaN and infinities become null."""
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path):
    """Yields a temp path in the target's folder; on success it replaces `path` (mode from the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path, mode: int = 0o755):
    """Yields a temp folder beside `path` to fill; on success it becomes `path` (which must be absent or empty),
    on failure it is removed: a failed run never leaves a half-written folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        tmp.chmod(mode)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path, text: str):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def json_safe(value):
    """A value JSON can hold: non-finite floats -> None, tensors/numpy scalars -> Python numbers, keys -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return json_safe(value.item())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json_atomic(path, data, indent: int | None = 2):
    write_text_atomic(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")
