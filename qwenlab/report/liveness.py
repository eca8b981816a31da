"""Whether a `qwenlab report` run is alive. Its metrics.json names the process writing it (pid, host, the process's
start time) and carries a heartbeat (`heartbeat_utc`) the run refreshes at each notebook boundary and every
HEARTBEAT_S seconds from a thread. A run whose metrics.json still says "running" is dead when that process is gone
(checked on the same host) or its heartbeat is older than STALE_S (from any host): killed hard (kill -9, OOM killer,
power loss), it could not say so itself."""
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from qwenlab.atomic import write_json_atomic

HEARTBEAT_S = 15.0
STALE_S = 120.0
UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_text(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime(UTC_FORMAT)


def parse_utc(text) -> float | None:
    try:
        return datetime.strptime(text, UTC_FORMAT).replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def process_identity() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": psutil.Process().create_time()}


def same_process_alive(pid: int, started: float | None) -> bool:
    """pid still runs the process that started at `started` (not a later process given the same pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def death(header: dict, now: float | None = None) -> str | None:
    """Why a run whose metrics.json says "running" is dead; None while it may be alive (or is not running)."""
    if header.get("status") != "running":
        return None
    pid, host = header.get("pid"), header.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not same_process_alive(pid, header.get("pid_started")):
        return f"its process {pid} on {host} is gone"
    beat = header.get("heartbeat_utc") or header.get("started_utc")
    last = parse_utc(beat)
    if last is None or (time.time() if now is None else now) - last > STALE_S:
        return f"no heartbeat since {beat}"
    return None


class RunFile:
    """A running report's metrics.json and the record it holds: the report and its heartbeat thread write it under
    one lock, so a heartbeat never writes a half-changed record or an older one over a newer."""

    def __init__(self, run_dir: Path, record: dict):
        self.run_dir, self.record = run_dir, record
        self.lock = threading.RLock()
        self._stop = threading.Event()

    def save(self):
        with self.lock:
            self.record["header"]["heartbeat_utc"] = utc_text()
            write_json_atomic(self.run_dir / "metrics.json", self.record)

    def start_heartbeat(self, every: float = HEARTBEAT_S):
        def beat():
            while not self._stop.wait(every):
                with self.lock:
                    if self._stop.is_set():
                        return
                    try:
                        self.save()
                    except OSError:  # a full disk: the next notebook boundary tries again
                        pass

        threading.Thread(target=beat, name="report-heartbeat", daemon=True).start()

    def stop_heartbeat(self):
        with self.lock:
            self._stop.set()
