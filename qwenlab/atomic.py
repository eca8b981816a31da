"""Atomic file writes: a temp file or folder beside the target, then os.replace, so nothing the user has is left
half-written or overwritten on failure. JSON is written strict: NaN and infinities become null.

Temps are named `.qwenlab-tmp.<host>.<pid>.<random>.<target name>`. An exception, Ctrl-C or SIGTERM removes the
temp of the write it interrupts (SIGTERM raises Terminated, a KeyboardInterrupt, in the main thread while a write
is open); a write killed outright (kill -9, a crash) leaves its temp, and the next atomic write into the same
folder removes it once the process named in it is gone (sweep)."""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import psutil

TEMP_MARK = ".qwenlab-tmp"
TEMP_NAME = re.compile(r"\.qwenlab-tmp\.([0-9a-f]{8})\.(\d+)\.[a-z0-9_]{8}\..*", re.S)
MAX_NAME = 200  # of the target name kept in the temp's name (file names stop at 255 bytes)

_umask_lock = threading.Lock()
_swept: set[str] = set()


class Terminated(KeyboardInterrupt):
    """SIGTERM during an atomic write: raised in the main thread so the write's temp is removed on the way out."""


def _umask() -> int:
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix() -> str:
    return f"{TEMP_MARK}.{host_tag()}.{os.getpid()}."


def process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def sweep(folder) -> list[Path]:
    """Removes the temps in `folder` that atomic writes on this host left behind and whose process is gone."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed, here = [], host_tag()
    for entry in entries:
        found = TEMP_NAME.fullmatch(entry.name)
        if found is None or found[1] != here or process_alive(int(found[2])):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _sweep_once(folder: Path):
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        sweep(folder)


@contextmanager
def removed_on_sigterm():
    """While open, SIGTERM raises Terminated in the main thread (unless something else already handles SIGTERM,
    such as `qwenlab report`); a second SIGTERM is ignored until the first one's clean-up is done."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _suffix(path: Path) -> str:
    return "." + path.name[:MAX_NAME]


@contextmanager
def atomic_path(path):
    """Yields a temp path in the target's folder; on success it replaces `path` (mode from the umask)."""
    path = Path(path)
    _sweep_once(path.parent)
    with removed_on_sigterm():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(), suffix=_suffix(path))
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
    _sweep_once(path.parent)
    with removed_on_sigterm():
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=_suffix(path), dir=path.parent))
        try:
            yield tmp
            if path.exists():
                path.rmdir()
            tmp.chmod(mode)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def scratch_dir(name: str):
    """A temp folder in the system temp dir for the length of the block, removed like atomic_dir's temp."""
    root = Path(tempfile.gettempdir())
    _sweep_once(root)
    with removed_on_sigterm():
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=f".{name}", dir=root))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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
