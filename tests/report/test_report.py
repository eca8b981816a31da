"""`qwenlab report` over tiny fake notebooks (tests/report/fixtures/notebooks): 01_ok passes, 02_regress regresses unless
its `limit` is raised, 03_boom raises. The real notebooks are exercised by tests/test_report_real.py."""
import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from qwenlab import cli
from qwenlab.activations.dump import write_dump
from qwenlab.model.config import read_config
from qwenlab.model.tiny import ensure_tiny
from qwenlab.report import params as report_params
from qwenlab.report import run as report
from qwenlab.report import rundir as report_io
from qwenlab.versions import environment

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "notebooks"


@pytest.fixture(scope="module")
def tiny():
    return ensure_tiny().resolve()


def run(out, *extra, model=None):
    argv = ["report", "--notebooks-dir", str(FIXTURES), "--out", str(out), "--device", "cpu", *extra]
    if model is not None:
        argv += ["--model", str(model)]
    return cli.main(argv)


def rows(index_html: str) -> dict:
    """notebook -> verdict as index.html's table marks it."""
    return dict((nb, v) for v, nb in re.findall(r'<tr class="verdict-(\w+)" id="nb-([\w-]+)">', index_html))


def test_passing_run_writes_the_layout_and_merged_metrics(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    candidate = write_dump(tmp_path / "cand.safetensors", {"embed": torch.zeros(1, 2)}, {"prompt_ids": [1]})
    out = tmp_path / "reports"

    rc = run(out, "--only", "01,02_regress", "--candidate", str(candidate), "-p", "scale=2",
             "-p", "02_regress.limit=10", model=tiny)

    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (run_dir,) = [p for p in out.iterdir() if p.name != "latest"]
    assert re.fullmatch(r"\d{8}T\d{6}Z_tiny-qwen3", run_dir.name)
    assert captured.out.strip().splitlines()[-1].startswith(f"{run_dir} PASS")
    assert re.search(r"\[1/2\] 01_ok \.\.\. pass \(\d+\.\d s\)", captured.err)
    assert re.search(r"\[2/2\] 02_regress \.\.\. pass \(\d+\.\d s\)", captured.err)
    for name in ("01_ok.ipynb", "01_ok.html", "02_regress.ipynb", "02_regress.html", "metrics.json", "index.html",
                 "metrics/01_ok.json", "metrics/02_regress.json", "figures/01_ok_line.png"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "03_boom.ipynb").exists()
    assert not (out / "latest").exists()  # two of the three notebooks: latest only ever shows a run of all of them
    assert f"{out / 'latest'} not moved: this run has 2 of the 3 notebooks" in captured.err

    record = json.loads((run_dir / "metrics.json").read_text())
    header = record["header"]
    assert record["verdict"] == "pass" and record["counts"] == {"pass": 2, "regressed": 0, "error": 0}
    assert header["status"] == "complete" and header["device"] == "cpu" and header["dtype"] == "float32"
    assert header["model_path"] == str(tiny) and header["config_hash"] == read_config(tiny).config_hash()
    assert header["seeds"] == {"01_ok": {"seed": 1234}}
    assert header["versions"]["torch"] and header["versions"]["transformers"] and header["versions"]["tokenizers"]
    assert header["notebooks"] == ["01_ok", "02_regress"] and header["subset"] is True
    assert header["pid"] == os.getpid() and header["heartbeat_utc"] and header["kernel"]["argv"][0] == sys.executable
    assert header["git_commit"]
    ok, regress = record["notebooks"]["01_ok"], record["notebooks"]["02_regress"]
    assert ok["verdict"] == "pass" and ok["error"] is None
    assert ok["figures"] == ["figures/01_ok_a_detail.png", "figures/01_ok_line.png"]
    assert set(ok) == {"verdict", "reasons", "metrics", "error", "duration_s", "parameters", "ipynb", "html", "figures",
                       "environment"}
    assert json.loads((run_dir / "metrics/01_ok.json").read_text())["key_figure"] == "figures/01_ok_line.png"
    assert ok["metrics"]["answer"] == 42 and ok["metrics"]["scaled"] == 4.0  # -p scale=2 reached 01 as a number
    assert ok["metrics"]["nested"] == {"ratio": 0.25, "series": [1, 2, 3]}
    assert ok["metrics"]["model_dir"] == str(tiny) and ok["metrics"]["device"] == "cpu"
    assert ok["metrics"]["thresholds_dir"] == ""
    assert ok["metrics"]["cwd"] == str(report.REPO_ROOT)
    assert ok["environment"] == regress["environment"] == header["environment"] == environment()
    # The kernel did not inherit MPLBACKEND=Agg, so ipykernel chose the inline backend: figures land in the notebook.
    assert ok["metrics"]["MPLBACKEND"] != "Agg" and "inline" in ok["metrics"]["mpl_backend"]
    assert os.environ["MPLBACKEND"] == "Agg"  # restored in this process
    assert regress["metrics"] == {"measured_error": 2.5, "limit": 10, "candidate": str(candidate)}
    assert regress["parameters"] == {"candidate": str(candidate), "limit": 10}
    assert ok["parameters"] == {"scale": 2}

    index = (run_dir / "index.html").read_text()
    assert rows(index) == {"01_ok": "pass", "02_regress": "pass"}
    assert 'href="01_ok.html"' in index and 'href="02_regress.html"' in index and 'href="metrics.json"' in index
    assert "data:image/png;base64," in index and "01_ok_line" in index
    # One key figure per notebook, the one it marked (the detail sorts first but is only linked in the details).
    assert re.findall(r'<a href="(figures/[\w.-]+)"><img class="key"', index) == ["figures/01_ok_line.png"]
    assert index.index('<table class="verdicts">') < index.index('<img class="key"') < index.index('id="details"')
    assert index.index('href="figures/01_ok_a_detail.png"') > index.index('id="details"')
    assert header["config_hash"] in index and str(tiny) in index and "seed=1234" in index
    executed = nbformat.read(run_dir / "01_ok.ipynb", as_version=4)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in executed.cells for o in c.get("outputs", []))
    assert "01 ok: a fake notebook" in (run_dir / "01_ok.html").read_text()


def test_regression_and_error_exit_1_after_every_notebook_ran(tmp_path, tiny, capsys):
    out = tmp_path / "reports"

    rc = run(out)

    captured = capsys.readouterr()
    assert rc == 1
    run_dir = (out / "latest").resolve()  # complete, with failures: latest moves
    assert captured.out.strip().splitlines()[-1].startswith(f"{run_dir} ERROR")
    assert "[3/3] 03_boom ... error" in captured.err and "ValueError: planted failure" in captured.err
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["verdict"] == "error" and record["counts"] == {"pass": 1, "regressed": 1, "error": 1}
    nbs = record["notebooks"]
    assert nbs["01_ok"]["verdict"] == "pass" and nbs["01_ok"]["metrics"]["answer"] == 42
    assert nbs["02_regress"]["verdict"] == "regressed"
    assert nbs["02_regress"]["metrics"]["measured_error"] == 2.5 and nbs["02_regress"]["metrics"]["limit"] == 1.0
    assert nbs["02_regress"]["reasons"] == ["measured_error = 2.5 exceeds 1"]
    boom = nbs["03_boom"]
    assert boom["verdict"] == "error" and boom["metrics"] == {}
    assert boom["error"]["ename"] == "ValueError" and boom["error"]["evalue"] == "planted failure in 03_boom"

    index = (run_dir / "index.html").read_text()
    assert rows(index) == {"01_ok": "pass", "02_regress": "regressed", "03_boom": "error"}
    assert "measured_error = 2.5 exceeds 1" in index and "planted failure in 03_boom" in index
    assert 'href="03_boom.html"' in index and 'href="03_boom.ipynb"' in index
    assert "overall: error" in index

    executed = nbformat.read(run_dir / "03_boom.ipynb", as_version=4)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert [e["ename"] for e in errors] == ["ValueError"]
    assert "planted failure in 03_boom" in (run_dir / "03_boom.html").read_text()


def test_regressed_alone_exits_1(tmp_path, tiny, capsys):
    rc = run(tmp_path / "reports", "--only", "02")
    assert rc == 1
    (run_dir,) = (tmp_path / "reports").iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["verdict"] == "regressed" and record["notebooks"]["02_regress"]["verdict"] == "regressed"
    assert capsys.readouterr().out.strip().endswith("REGRESSED (0 pass, 1 regressed, 0 error)")


@pytest.mark.parametrize("extra, words", [
    (["-p", "nosuch=1"], ["nosuch"]),
    (["-p", "01_ok.limit=3"], ["limit", "01_ok"]),
    (["--only", "01", "-p", "limit=3"], ["limit"]),
    (["--only", "01", "--candidate", __file__], ["candidate"]),
    (["-p", "07.x=1"], ["07"]),
    (["--only", "09"], ["09"]),
    (["-p", "model_dir=x"], ["model_dir"]),
    (["--model", "/nonexistent/model"], ["/nonexistent/model"]),
    (["--model", str(FIXTURES)], ["config.json"]),
    (["--candidate", "/nonexistent.safetensors"], ["/nonexistent.safetensors"]),
])
def test_bad_request_exits_2_before_anything_runs(tmp_path, monkeypatch, capsys, extra, words):
    monkeypatch.setattr(report, "execute", lambda *a, **k: pytest.fail("a notebook ran"))
    out = tmp_path / "reports"

    rc = run(out, *extra)

    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("qwenlab report: error:") and len(err.splitlines()) == 1
    assert all(w in err for w in words), err
    assert not out.exists()


def test_notebook_without_a_standard_parameter_is_refused(tmp_path, capsys):
    nb = nbformat.read(FIXTURES / "03_boom.ipynb", as_version=4)
    nb.cells[1].source = 'model_dir = ""\nout_dir = ""'
    folder = tmp_path / "nbs"
    folder.mkdir()
    nbformat.write(nb, folder / "01_partial.ipynb")
    rc = cli.main(["report", "--notebooks-dir", str(folder), "--out", str(tmp_path / "reports"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "01_partial" in err and "device" in err and "thresholds_dir" in err
    assert not (tmp_path / "reports").exists()


def test_latest_is_not_moved_by_a_run_that_does_not_complete(tmp_path, tiny, monkeypatch):
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    shutil.copy(FIXTURES / "01_ok.ipynb", notebooks)
    out = tmp_path / "reports"
    argv = ["report", "--notebooks-dir", str(notebooks), "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    first = (out / "latest").resolve()

    def broken(*args, **kwargs):
        raise RuntimeError("index rendering crashed")

    monkeypatch.setattr(report, "render_index", broken)
    assert cli.main(argv) == 1  # the top-level handler: one line, exit 1

    assert (out / "latest").resolve() == first
    (second,) = [p for p in out.iterdir() if p.name not in ("latest", first.name)]
    assert not (second / "index.html").exists() and (second / "01_ok.ipynb").is_file()
    partial = json.loads((second / "metrics.json").read_text())
    assert partial["header"]["status"] == "dead" and partial["verdict"] == "dead"
    assert partial["header"]["died"] == "the report crashed: RuntimeError: index rendering crashed"
    assert partial["notebooks"]["01_ok"]["verdict"] == "pass"
    assert not [p for p in out.iterdir() if p.name.startswith(".latest")]


def test_parameter_values_parse_as_json_else_string():
    assert report_params.parse_param_args(["a=1", "b=0.5", "c=true", "d=[1, 2]", "e=hello world", 'f="7"', "g=",
                                           "03_layer_diffs.h=null", "03.i={\"k\": 1}"]) == (
        {"a": 1, "b": 0.5, "c": True, "d": [1, 2], "e": "hello world", "f": "7", "g": ""},
        {"03_layer_diffs": {"h": None}, "03": {"i": {"k": 1}}})
    for bad in ("novalue", "=3", "1x=2", "a.b-c=1"):
        with pytest.raises(report.QwenlabError):
            report_params.parse_param_args([bad])


def test_run_folders_never_collide(tmp_path):
    from datetime import datetime, timezone

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    a = report_io.make_run_dir(tmp_path, "my model", now)
    b = report_io.make_run_dir(tmp_path, "my model", now)
    assert a.name == "20260102T030405Z_my-model" and b.name == "20260102T030405Z_my-model-2"
    assert (a / "metrics").is_dir() and (a / "figures").is_dir()


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_notebooks_kernel_starts_and_imports_while_the_one_before_runs(tmp_path, tiny, monkeypatch, ahead):
    """The second notebook's first cell finds torch, pandas and qwenlab already imported (its kernel started while
    the first notebook ran, WARM_UP sent there) and no name of the warm-up in its namespace; its execution counts
    start at 1. With --no-kernel-ahead it imports them itself. Either way every kernel is stopped at the end."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.read(FIXTURES / "01_ok.ipynb", as_version=4)
    for cell in nb.cells:
        cell.source = cell.source.replace('"01_ok"', '"01_first"')
    nbformat.write(nb, folder / "01_first.ipynb")
    nb = nbformat.read(FIXTURES / "01_ok.ipynb", as_version=4)
    for cell in nb.cells:
        cell.source = cell.source.replace('"01_ok"', '"02_second"')
    nb.cells[2].source = ("import sys\n"
                          "ahead = {m: m in sys.modules for m in ('torch', 'pandas', 'qwenlab')}\n"
                          "leaked = sorted(n for n in dir() if n.startswith('_qwenlab'))\n" + nb.cells[2].source)
    nb.cells[3].source = nb.cells[3].source.replace('metrics = {"answer": 42,',
                                                    'metrics = {"ahead": ahead, "leaked": leaked, "answer": 42,')
    nbformat.write(nb, folder / "02_second.ipynb")
    out = tmp_path / "reports"
    argv = ["report", "--notebooks-dir", str(folder), "--out", str(out), "--device", "cpu", "--model", str(tiny)]
    assert cli.main(argv + ([] if ahead else ["--no-kernel-ahead"])) == 0
    (run_dir,) = [p for p in out.iterdir() if p.name != "latest"]
    record = json.loads((run_dir / "metrics.json").read_text())
    metrics = record["notebooks"]["02_second"]["metrics"]
    assert record["header"]["kernels_ahead"] is ahead
    assert metrics["ahead"] == {"torch": ahead, "pandas": ahead, "qwenlab": ahead}
    assert metrics["leaked"] == []
    executed = nbformat.read(run_dir / "02_second.ipynb", as_version=4)
    assert [c.execution_count for c in executed.cells if c.cell_type == "code"][:2] == [1, 2]
    assert (run_dir / "logs" / "02_second.kernel.log").exists()  # the report starts every kernel, ahead or not
    assert _child_kernels() == []  # the report ran in this process: none of its kernels is left running


def _child_kernels() -> list[int]:
    """ipykernel processes whose parent is this process."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ipykernel_launcher" in (proc / "cmdline").read_bytes() \
                    and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
