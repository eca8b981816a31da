"""Ctrl-C / SIGTERM during a real `qwenlab report` (notebooks 03 and 04 on the tiny model, in a subprocess, stopped
during 03): 03's kernel and 04's, started ahead, are stopped, the run is marked interrupted with 04 not run, `latest`
stays, one line on stderr, exit 130, no traceback."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from qwenlab.paths import REPO_ROOT
from tests.processes import ipykernel_children


def kernels_of(proc: subprocess.Popen, n: int, timeout: float = 60.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if len(children := ipykernel_children(proc.pid)) >= n:
            return children
        time.sleep(0.1)
    pytest.fail(f"fewer than {n} kernels started")


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "sigterm"])
def test_signal_marks_the_run_interrupted(tmp_path, tiny_dir, signum, to_group):
    out = tmp_path / "reports"
    (out / "previous").mkdir(parents=True)
    os.symlink("previous", out / "latest")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "qwenlab.report", "--model", str(tiny_dir), "--only", "03,04",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        kernels = kernels_of(proc, 2)  # 03's, and 04's started ahead
        time.sleep(1.5)  # 03's kernel is up and running the notebook's cells
        os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)  # Ctrl-C reaches the whole group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()

    (run_dir,) = [p for p in out.iterdir() if p.name not in ("latest", "previous")]
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == "", stderr
    lines = stderr.strip().splitlines()
    assert lines[-1] == f"qwenlab report: interrupted during 03_layer_diffs; partial run in {run_dir}"
    assert lines[:-1] == [f"[1/2] 03_layer_diffs ... interrupted ({signal.Signals(signum).name})"]
    assert all(gone(k) for k in kernels), "a kernel outlived the report"
    assert os.readlink(out / "latest") == "previous"

    record = json.loads((run_dir / "metrics.json").read_text())
    header = record["header"]
    assert header["status"] == "interrupted" and header["interrupted_notebook"] == "03_layer_diffs"
    assert header["signal"] == signal.Signals(signum).name and header["not_run"] == ["04_decode_kv_parity"]
    assert record["verdict"] == "interrupted" and record["notebooks"]["03_layer_diffs"]["verdict"] == "interrupted"
    index = (run_dir / "index.html").read_text()
    assert "overall: interrupted" in index and 'id="interrupted"' in index and "03_layer_diffs" in index
