"""`reports/latest` moves only to a complete run of every notebook, and only to the run that started last; a run killed
outright (kill -9) is recognisable: `qwenlab report --status` lists it dead and the next report marks it dead in its
metrics.json and index.html. The notebooks here are made by the test: each waits for its `gate` file, if given, then
writes pass metrics, so the test decides when a run finishes."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from qwenlab import cli
from qwenlab.paths import REPO_ROOT
from qwenlab.report.liveness import STALE_S, RunFile, death, utc_text
from tests.processes import ipykernel_child

STANDARD = 'model_dir = ""\ndevice = "cpu"\ndtype = "float32"\nout_dir = ""\nthresholds_dir = ""\nquant = ""\n' \
           'device_map = ""\ngate = ""'


def gated_notebooks(folder: Path, *stems: str) -> Path:
    folder.mkdir()
    for stem in stems:
        params = nbformat.v4.new_code_cell(STANDARD, metadata={"tags": ["parameters"]})
        body = nbformat.v4.new_code_cell(textwrap.dedent(f"""\
            import os, time
            from qwenlab.checks.nbutil import write_metrics
            while gate and not os.path.exists(gate):
                time.sleep(0.05)
            write_metrics(out_dir, "{stem}", {{"gate": gate}}, [])"""))
        nb = nbformat.v4.new_notebook(cells=[params, body], metadata={
            "kernelspec": {"name": "qwenlab", "display_name": "qwenlab", "language": "python"}})
        nbformat.write(nb, folder / f"{stem}.ipynb")
    return folder


def argv(tiny_dir, notebooks: Path, out: Path, *extra) -> list[str]:
    return ["report", "--model", str(tiny_dir), "--device", "cpu", "--notebooks-dir", str(notebooks),
            "--out", str(out), "--timeout", "300", *extra]


def start(tiny_dir, notebooks, out, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "qwenlab", *argv(tiny_dir, notebooks, out, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(what, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"never happened: {proc.communicate()}")
        time.sleep(0.05)
    return found


def running_in(out: Path, stem: str, exclude=()) -> Path | None:
    """The run folder (not one of `exclude`) whose notebook `stem` has started."""
    return next((log.parents[1] for log in out.glob(f"*/logs/{stem}.log") if log.parents[1] not in exclude), None)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def status(out: Path, capsys) -> dict:
    """run name -> its --status line."""
    capsys.readouterr()
    assert cli.main(["report", "--status", "--out", str(out)]) == 0
    return {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}


def test_a_subset_never_moves_latest(tmp_path, tiny_dir, capsys):
    notebooks = gated_notebooks(tmp_path / "nbs", "01_a", "02_b")
    out = tmp_path / "reports"
    assert cli.main(argv(tiny_dir, notebooks, out)) == 0
    full = (out / "latest").resolve()

    assert cli.main(argv(tiny_dir, notebooks, out, "--only", "02")) == 0

    assert "latest not moved: this run has 1 of the 2 notebooks" in capsys.readouterr().err
    (subset,) = [p for p in out.iterdir() if p.name not in ("latest", full.name)]
    assert (out / "latest").resolve() == full
    assert metrics(subset)["header"]["status"] == "complete" and metrics(subset)["header"]["subset"] is True
    lines = status(out, capsys)
    assert lines[full.name].split()[1:4] == ["complete", "pass", "2/2"] and lines[full.name].endswith("<- latest")
    assert lines[subset.name].split()[1:5] == ["complete", "pass", "1/1", "(--only)"]


def test_of_concurrent_runs_the_one_that_started_last_wins(tmp_path, tiny_dir, capsys):
    notebooks = gated_notebooks(tmp_path / "nbs", "01_gate")
    out = tmp_path / "reports"
    first = start(tiny_dir, notebooks, out, "-p", f"gate={tmp_path / 'open-first'}")
    first_dir = wait_for(lambda: running_in(out, "01_gate"), first)
    second = start(tiny_dir, notebooks, out, "-p", f"gate={tmp_path / 'open-second'}")
    second_dir = wait_for(lambda: running_in(out, "01_gate", exclude=[first_dir]), second)
    lines = status(out, capsys)
    assert lines[first_dir.name].split()[1:3] == lines[second_dir.name].split()[1:3] == ["running", "-"]

    (tmp_path / "open-second").touch()  # the run that started last finishes first ...
    assert second.wait(300) == 0, second.communicate()
    assert os.readlink(out / "latest") == second_dir.name
    (tmp_path / "open-first").touch()  # ... and the earlier one finishing later does not take latest back
    stdout, stderr = first.communicate(timeout=300)

    assert first.returncode == 0, stderr
    assert os.readlink(out / "latest") == second_dir.name
    assert f"{out / 'latest'} not moved: it points at {second_dir.name}, which started later" in stderr
    assert metrics(first_dir)["header"]["started_at"] < metrics(second_dir)["header"]["started_at"]
    assert metrics(first_dir)["header"]["status"] == "complete"


def kernel_of(proc: subprocess.Popen) -> psutil.Process:
    return wait_for(lambda: ipykernel_child(proc.pid), proc)


def test_a_killed_run_is_dead_in_status_and_marked_by_the_next_run(tmp_path, tiny_dir, capsys):
    notebooks = gated_notebooks(tmp_path / "nbs", "01_gate")
    out = tmp_path / "reports"
    killed = start(tiny_dir, notebooks, out, "-p", f"gate={tmp_path / 'never'}")
    killed_dir = wait_for(lambda: running_in(out, "01_gate"), killed)
    kernel = kernel_of(killed)
    killed.kill()
    killed.communicate()
    try:
        kernel.kill()
    except psutil.NoSuchProcess:
        pass
    header = metrics(killed_dir)["header"]
    assert header["status"] == "running" and header["pid"] == killed.pid and header["host"] == socket.gethostname()
    assert header["heartbeat_utc"]

    line = status(out, capsys)[killed_dir.name]
    assert line.split()[1:3] == ["dead", "-"] and f"its process {killed.pid} on {socket.gethostname()} is gone" in line

    (tmp_path / "open").touch()
    assert cli.main(argv(tiny_dir, notebooks, out, "-p", f"gate={tmp_path / 'open'}")) == 0

    err = capsys.readouterr().err
    assert f"marked {killed_dir.name} dead: its process {killed.pid} on {socket.gethostname()} is gone" in err
    record = metrics(killed_dir)
    assert record["header"]["status"] == "dead" and record["verdict"] == "dead"
    assert record["header"]["dead_notebook"] == "01_gate" and record["notebooks"]["01_gate"]["verdict"] == "dead"
    assert record["header"]["marked_dead_by"] == os.readlink(out / "latest")
    index = (killed_dir / "index.html").read_text()
    assert 'id="dead"' in index and "overall: dead" in index and "is gone" in index
    assert status(out, capsys)[killed_dir.name].split()[1:3] == ["dead", "dead"]


def test_a_heartbeat_goes_stale_for_a_run_on_another_host(tmp_path):
    header = {"status": "running", "pid": 1, "host": "another-host", "started_utc": utc_text(),
              "heartbeat_utc": utc_text()}
    assert death(header) is None  # another host's pid cannot be checked from here: its heartbeat is fresh
    old = utc_text(time.time() - STALE_S - 60)
    assert death({**header, "heartbeat_utc": old}) == f"no heartbeat since {old}"
    assert death({**header, "status": "complete", "heartbeat_utc": old}) is None


def test_the_heartbeat_thread_writes_metrics_json(tmp_path):
    record = {"header": {"status": "running", "heartbeat_utc": None}, "notebooks": {}}
    run_file = RunFile(tmp_path, record)
    run_file.start_heartbeat(every=0.01)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "metrics.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        run_file.stop_heartbeat()
    assert metrics(tmp_path)["header"]["heartbeat_utc"] == record["header"]["heartbeat_utc"] is not None
