"""`qwenlab report` runs its notebooks in the Python of the command that asked for them: two environments with their
own checkouts on one machine each get their own kernel, even with a per-user `qwenlab` kernelspec pointing at the
other one; a kernelspec that cannot start or runs another Python is refused before anything is written; a kernel
whose measured environment differs from the report's fails its notebook with one line."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from qwenlab import cli
from qwenlab.paths import REPO_ROOT
from qwenlab.report import run as report

FIXTURES = Path("tests") / "report" / "fixtures" / "notebooks"


def make_venv(root: Path, *first_on_path: Path) -> Path:
    """A venv whose heavy packages are this one's (a .pth adding our site-packages, after `first_on_path`; their
    data files in share/jupyter, such as nbconvert's templates, linked), with no kernelspec of its own yet."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    (root / "share" / "jupyter").mkdir(parents=True)
    for data in (Path(sys.prefix) / "share" / "jupyter").iterdir():
        if data.name != "kernels":
            (root / "share" / "jupyter" / data.name).symlink_to(data)
    site = Path(subprocess.run([root / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    if first_on_path:
        (site / "00-checkout.pth").write_text("".join(f"{p}\n" for p in first_on_path))
    (site / "zz-shared.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return root / "bin" / "python"


def copy_checkout(dst: Path) -> Path:
    """The repo's files as a second checkout (tracked and untracked, not the ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO_ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, dst / name)
    return dst


def user_kernelspec(data_dir: Path, python) -> Path:
    """A per-user `qwenlab` kernelspec (JUPYTER_DATA_DIR) running `python`: what shadowed the right one before."""
    spec = data_dir / "kernels" / "qwenlab" / "kernel.json"
    spec.parent.mkdir(parents=True)
    spec.write_text(json.dumps({"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                "display_name": "qwenlab", "language": "python"}))
    return spec


def report_in(python, checkout: Path, out: Path, tiny_dir, cwd: Path, user_data: Path | None = None, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JUPYTER_PATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", **({"JUPYTER_DATA_DIR": str(user_data)} if user_data else {}))
    return subprocess.run([str(python), "-m", "qwenlab", "report", "--model", str(tiny_dir), "--device", "cpu",
                           "--notebooks-dir", str(checkout / FIXTURES), "--only", "01", "--out", str(out), *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """A second environment on this machine with its own checkout: (python, checkout)."""
    root = tmp_path_factory.mktemp("second")
    checkout = copy_checkout(root / "checkout")
    return make_venv(root / "venv", checkout), checkout


@pytest.fixture(scope="module")
def third(tmp_path_factory):
    """One more environment, for kernelspecs that are broken (each test writes its own)."""
    return make_venv(tmp_path_factory.mktemp("third") / "venv")


def test_each_environment_runs_its_own_kernel(tmp_path, tiny_dir, second):
    python2, checkout2 = second
    python1 = Path(sys.executable)
    runs = {"first": (python1, REPO_ROOT, python2), "second": (python2, checkout2, python1)}
    for name, (python, checkout, other) in runs.items():
        user_data = tmp_path / name / "user"
        user_kernelspec(user_data, other)  # the per-user spec of the same name runs the other environment's python
        out = tmp_path / name / "reports"

        done = report_in(python, checkout, out, tiny_dir, tmp_path, user_data)

        assert done.returncode == 0, done.stderr
        (run_dir,) = out.iterdir()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        measured = metrics["notebooks"]["01_ok"]["environment"]  # written by the notebook, inside the kernel
        assert measured["executable"] == str(python), name
        assert measured["qwenlab_path"] == str(checkout / "qwenlab"), name
        assert measured["prefix"] == str(python.parent.parent), name
        assert metrics["header"]["environment"] == measured  # the report's own, measured in the calling process
        kernel = metrics["header"]["kernel"]
        assert kernel["argv"][0] == str(python)
        assert kernel["spec"] == str(python.parent.parent / "share" / "jupyter" / "kernels" / "qwenlab" / "kernel.json")
    assert json.loads(Path(kernel["spec"]).read_text())["argv"][0] == str(python2)  # installed by the second's run


@pytest.mark.parametrize("argv0", ["missing", "other"])
def test_broken_kernelspec_exits_2_before_anything_is_written(tmp_path, tiny_dir, third, argv0):
    python = third
    spec = python.parent.parent / "share" / "jupyter" / "kernels" / "qwenlab" / "kernel.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    wrong = tmp_path / "gone" / "bin" / "python" if argv0 == "missing" else Path(sys.executable)
    spec.write_text(json.dumps({"argv": [str(wrong), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                "display_name": "qwenlab", "language": "python"}))
    out = tmp_path / "reports"
    (out / "previous").mkdir(parents=True)
    os.symlink("previous", out / "latest")

    done = report_in(python, REPO_ROOT, out, tiny_dir, tmp_path)

    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"qwenlab report: error: kernelspec qwenlab ({spec})")
    assert str(wrong) in line
    assert ("does not exist" if argv0 == "missing" else f"not this command's {python}") in line
    assert sorted(p.name for p in out.iterdir()) == ["latest", "previous"] and os.readlink(out / "latest") == "previous"
    assert list((out / "previous").iterdir()) == []


def test_kernel_in_another_environment_fails_its_notebook(tmp_path, tiny_dir, monkeypatch, capsys):
    own = report.environment()
    monkeypatch.setattr(report, "environment", lambda: {**own, "torch": "0.0-elsewhere"})
    out = tmp_path / "reports"

    rc = cli.main(["report", "--model", str(tiny_dir), "--device", "cpu", "--notebooks-dir",
                   str(REPO_ROOT / FIXTURES), "--only", "01", "--out", str(out)])

    assert rc == 1
    err = capsys.readouterr().err.splitlines()
    problem = [line.strip() for line in err if "EnvironmentMismatch" in line]
    assert problem == [f"EnvironmentMismatch: the kernel ran torch {own['torch']} (this command: 0.0-elsewhere)"]
    (run_dir,) = out.iterdir()
    entry = json.loads((run_dir / "metrics.json").read_text())["notebooks"]["01_ok"]
    assert entry["verdict"] == "error" and entry["error"]["ename"] == "EnvironmentMismatch"
    assert entry["environment"]["torch"] == own["torch"]
