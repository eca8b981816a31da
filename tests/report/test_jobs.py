"""`qwenlab report --jobs`: notebooks side by side, each in its own kernel, those whose metadata says so alone; and
the scheduling rules (report/schedule.py) on their own."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch
from safetensors.torch import save_file

from qwenlab import cli
from qwenlab.errors import QwenlabError
from qwenlab.model.tiny import ensure_tiny
from qwenlab.paths import NOTEBOOKS_DIR, REPO_ROOT
from qwenlab.report import schedule
from tests.processes import ipykernel_children

PARAMS = 'model_dir = ""\ndevice = "cpu"\ndtype = "float32"\nout_dir = ""\nthresholds_dir = ""\nquant = ""\n' \
         'device_map = ""\nseconds = 3.0'


def timed_notebook(folder: Path, stem: str, alone: str | None = None):
    """A notebook that records when it ran (wall clock, first and last cell) and sleeps `seconds` between."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "qwenlab", "display_name": "qwenlab", "language": "python"}
    if alone:
        nb.metadata["qwenlab"] = {"runs_alone": alone}
    params = nbformat.v4.new_code_cell(PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params,
                nbformat.v4.new_code_cell("import time\nbegan = time.time()\ntime.sleep(seconds)"),
                nbformat.v4.new_code_cell("from qwenlab.checks.nbutil import write_metrics\n"
                                          f"write_metrics(out_dir, {stem!r}, "
                                          "{'began': began, 'ended': time.time(), "
                                          "'omp': __import__('os').environ.get('OMP_NUM_THREADS')}, [])")]
    nbformat.write(nb, folder / f"{stem}.ipynb")


@pytest.fixture(scope="module")
def tiny():
    return ensure_tiny().resolve()


def intervals(run_dir: Path) -> dict[str, tuple[float, float]]:
    record = json.loads((run_dir / "metrics.json").read_text())
    return {stem: (e["metrics"]["began"], e["metrics"]["ended"]) for stem, e in record["notebooks"].items()}


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_two_at_a_time_and_the_alone_one_with_none_beside_it(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    folder = tmp_path / "nbs"
    folder.mkdir()
    timed_notebook(folder, "01_a")
    timed_notebook(folder, "02_b")
    timed_notebook(folder, "03_alone", alone="it measures something the others would move")
    timed_notebook(folder, "04_c")
    out = tmp_path / "reports"
    argv = ["report", "--notebooks-dir", str(folder), "--out", str(out), "--device", "cpu", "--model", str(tiny),
            "--jobs", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    (run_dir,) = [p for p in out.iterdir() if p.name != "latest"]
    record = json.loads((run_dir / "metrics.json").read_text())
    header = record["header"]
    assert header["jobs"] == 2 and header["jobs_reason"] == "--jobs"
    assert header["runs_alone"] == {"03_alone": "it measures something the others would move"}
    assert header["start_order"] == ["03_alone", "01_a", "02_b", "04_c"]  # alone first; no earlier run to rank by
    assert list(record["notebooks"]) == ["01_a", "02_b", "03_alone", "04_c"]  # entries in notebook order
    assert record["verdict"] == "pass" and header["status"] == "complete"
    assert "2 notebooks at a time (--jobs); 03_alone alone: it measures something the others would move" in err
    for i, stem in enumerate(["01_a", "02_b", "03_alone", "04_c"], 1):
        assert f"[{i}/4] {stem} ... pass (" in err
    span = intervals(run_dir)
    assert not any(overlap(span["03_alone"], span[s]) for s in ("01_a", "02_b", "04_c"))
    assert overlap(span["01_a"], span["02_b"])  # the two lanes really ran side by side
    assert not overlap(span["04_c"], span["01_a"]) or not overlap(span["04_c"], span["02_b"])  # never three
    assert "notebooks at once" in (run_dir / "index.html").read_text()
    # the cores shared out between the kernels (OpenMP threads beyond the cores spin on each other)
    threads = header["kernel_threads"].get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))
    assert threads == (os.environ.get("OMP_NUM_THREADS") or str(max(1, os.cpu_count() // 2)))
    assert {e["metrics"]["omp"] for e in record["notebooks"].values()} == {threads}

    # A second run of the same model ranks the side-by-side notebooks by the first run's durations, longest first.
    durations = {stem: 1.0 for stem in span} | {"04_c": 9.0, "02_b": 5.0}
    latest = json.loads((out / "latest" / "metrics.json").read_text())
    for stem, seconds in durations.items():
        latest["notebooks"][stem]["duration_s"] = seconds
    (out / "latest" / "metrics.json").write_text(json.dumps(latest))
    assert schedule.previous_durations(out, tiny) == durations
    assert schedule.previous_durations(out, tmp_path) == {}  # another model's runs say nothing
    nbs = sorted(folder.glob("*.ipynb"))
    starts = schedule.order(nbs, {"03_alone": "x"}, 2, durations)
    assert [nb.stem for nb in starts] == ["03_alone", "04_c", "02_b", "01_a"]
    assert schedule.order(nbs, {"03_alone": "x"}, 1, durations) == nbs  # one lane: notebook order


def test_a_kernel_that_does_not_start_makes_its_notebook_an_error_and_the_others_run(tmp_path, tiny, monkeypatch,
                                                                                     capsys):
    """Every notebook runs on a kernel the report starts (tried twice); one that never starts makes that notebook an
    error naming the failure, without running it, while the others run beside it and no kernel is left."""
    import os as os_module

    from qwenlab.report import kernel as report_kernel

    real = report_kernel.tracked_kernel_manager

    def failing_for_02():
        base = real()

        class Manager(base):
            async def start_kernel(self, **kwargs):
                if "02_b" in getattr(kwargs.get("stderr"), "name", ""):
                    raise RuntimeError("no kernel for 02_b")
                return await super().start_kernel(**kwargs)

        return Manager

    monkeypatch.setattr(report_kernel, "tracked_kernel_manager", failing_for_02)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    folder = tmp_path / "nbs"
    folder.mkdir()
    for stem in ("01_a", "02_b", "03_c"):
        timed_notebook(folder, stem)
    out = tmp_path / "reports"
    argv = ["report", "--notebooks-dir", str(folder), "--out", str(out), "--device", "cpu", "--model", str(tiny),
            "--jobs", "2", "--param", "seconds=0.1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    (run_dir,) = [p for p in out.iterdir() if p.name != "latest"]
    record = json.loads((run_dir / "metrics.json").read_text())
    entries = record["notebooks"]
    assert {stem: e["verdict"] for stem, e in entries.items()} == {"01_a": "pass", "02_b": "error", "03_c": "pass"}
    assert entries["02_b"]["error"]["ename"] == "KernelStartError"
    assert entries["02_b"]["error"]["evalue"] == ("the 'qwenlab' Jupyter kernel did not start "
                                                  "(RuntimeError: no kernel for 02_b)")
    assert entries["02_b"]["ipynb"] is None  # it never ran
    assert "KernelStartError: the 'qwenlab' Jupyter kernel did not start" in err
    kernel_log = (run_dir / "logs" / "02_b.kernel.log").read_text()
    assert "kernel start 1 of 2 failed" in kernel_log and "kernel start 2 of 2 failed" in kernel_log
    assert ipykernel_children(os_module.getpid()) == []


def test_an_interrupt_stops_every_running_notebook(tmp_path, tiny):
    folder = tmp_path / "nbs"
    folder.mkdir()
    for stem in ("01_a", "02_b", "03_c"):
        timed_notebook(folder, stem)
    out = tmp_path / "reports"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "qwenlab.report", "--model", str(tiny), "--notebooks-dir",
                             str(folder), "--out", str(out), "--jobs", "2", "-p", "seconds=120"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(kernels := ipykernel_children(proc.pid)) < 3:  # 01's and 02's, and 03's started ahead
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        while not all((out / p / "logs" / f"{s}.log").exists() for p in os.listdir(out) for s in ("01_a", "02_b")):
            time.sleep(0.1)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = list(out.iterdir())
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == "", stderr
    assert stderr.strip().splitlines()[-1] == (f"qwenlab report: interrupted during 01_a, 02_b; partial run in "
                                               f"{run_dir}")
    assert not [k for k in kernels if k.is_running() and k.status() != "zombie"], "a kernel outlived the report"
    record = json.loads((run_dir / "metrics.json").read_text())
    header = record["header"]
    assert header["status"] == "interrupted" and header["interrupted_notebooks"] == ["01_a", "02_b"]
    assert header["interrupted_notebook"] == "01_a" and header["not_run"] == ["03_c"]
    assert {s: e["verdict"] for s, e in record["notebooks"].items()} == {"01_a": "interrupted",
                                                                         "02_b": "interrupted"}
    assert "during <b>01_a</b>, <b>02_b</b>" in (run_dir / "index.html").read_text()


def test_the_notebooks_that_measure_the_device_run_alone():
    alone = {nb.stem: schedule.runs_alone(nb) for nb in sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))}
    assert {stem for stem, why in alone.items() if why} == {"04_decode_kv_parity", "05_memory_fluctuation"}


def test_jobs_resolution(tmp_path, monkeypatch):
    save_file({"w": torch.zeros(250)}, tmp_path / "model.safetensors")
    size = (tmp_path / "model.safetensors").stat().st_size
    assert schedule.checkpoint_bytes(tmp_path) == size
    assert schedule.resolve_jobs("4", "cuda", tmp_path, None) == (4, "--jobs")
    for bad in ("0", "-1", "many"):
        with pytest.raises(QwenlabError, match=f"--jobs {bad}: expected a positive number or auto"):
            schedule.resolve_jobs(bad, "cpu", tmp_path, None)
    assert schedule.resolve_jobs("auto", "cpu", tmp_path, None)[0] == 1
    assert schedule.resolve_jobs("auto", "cuda", tmp_path, "balanced") == (1, "auto: a model split across devices")
    monkeypatch.setattr(schedule.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(schedule, "device_memory", lambda device: None)
    assert schedule.resolve_jobs("auto", "cuda", tmp_path, None)[0] == 1  # nvidia-smi said nothing
    monkeypatch.setattr(schedule, "device_memory", lambda device: 10 ** 6)
    n, why = schedule.resolve_jobs("auto", "cuda", tmp_path, None)
    assert n == 3 and why.startswith("auto: 16 CPU cores")  # 16 cores / 4, at most 3
    monkeypatch.setattr(schedule, "device_memory", lambda device: 2 * schedule.MEMORY_PER_JOB * size)
    assert schedule.resolve_jobs("auto", "cuda:0", tmp_path, None)[0] == 2  # the memory of two notebooks
    monkeypatch.setattr(schedule.os, "cpu_count", lambda: 2)
    assert schedule.resolve_jobs("auto", "cuda", tmp_path, None)[0] == 1  # two cores


def test_bad_jobs_exits_2_before_anything_runs(tmp_path, tiny, capsys):
    out = tmp_path / "reports"
    assert cli.main(["report", "--model", str(tiny), "--out", str(out), "--jobs", "0"]) == 2
    assert "--jobs 0: expected a positive number or auto" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
