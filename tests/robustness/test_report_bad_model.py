"""`qwenlab report` finds a bad request before it writes anything (exit 2, one line, no run folder, `latest`
untouched): a bad model folder (checked with the loader's own validation), an --out inside the model folder (unless
--force) or one it cannot write to, a --timeout that is not a positive number of seconds."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qwenlab import cli
from qwenlab.report import run as report

FIXTURES = Path(__file__).resolve().parents[1] / "report" / "fixtures" / "notebooks"


def reports_with_latest(folder: Path) -> Path:
    (folder / "previous").mkdir(parents=True)
    os.symlink("previous", folder / "latest")
    return folder


def untouched(out: Path) -> bool:
    return sorted(p.name for p in out.iterdir()) == ["latest", "previous"] and os.readlink(out / "latest") == \
        "previous" and not list((out / "previous").iterdir())


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qwenlab report: error: "), err
    return err


def rewrite_weights(ckpt: Path, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def pickle_only(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return ["pickle", str(ckpt)]


def wrong_shape(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.1.self_attn.k_norm.weight": t["model.norm.weight"].clone()}))
    return ["model.layers.1.self_attn.k_norm.weight", "shape"]


def missing_tensor(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    return ["model.layers.2.mlp.up_proj.weight", "missing"]


def missing_config(ckpt):
    (ckpt / "config.json").unlink()
    return [str(ckpt / "config.json"), "not found"]


def truncated(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [str(path)]


def missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    return [str(ckpt / "tokenizer.json")]


@pytest.fixture
def no_notebook(monkeypatch):
    monkeypatch.setattr(report, "execute", lambda *a, **k: pytest.fail("a notebook ran"))
    monkeypatch.setattr(report, "ensure_kernel", lambda *a, **k: pytest.fail("the kernel was looked at"))


@pytest.mark.parametrize("spoil", [pickle_only, wrong_shape, missing_tensor, missing_config, truncated,
                                   missing_tokenizer], ids=lambda f: f.__name__)
def test_bad_model_folder_exits_2_before_anything_is_written(tmp_path, tiny_dir, capsys, no_notebook, spoil):
    ckpt = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    words = spoil(ckpt)
    out = reports_with_latest(tmp_path / "reports")

    rc = cli.main(["report", "--model", str(ckpt), "--device", "cpu", "--out", str(out)])

    assert rc == 2
    err = one_line_error(capsys)
    assert all(w in err for w in words), err
    assert untouched(out)


@pytest.mark.parametrize("where", ["inside", "equal"])
def test_out_inside_the_model_folder_is_refused(tmp_path, tiny_dir, capsys, no_notebook, where):
    ckpt = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    before = sorted(p.name for p in ckpt.iterdir())
    out = ckpt / "reports" if where == "inside" else ckpt

    rc = cli.main(["report", "--model", str(ckpt), "--device", "cpu", "--out", str(out)])

    assert rc == 2
    err = one_line_error(capsys)
    assert f"--out {out}: inside the model folder {ckpt}" in err and "--force" in err
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_force_writes_the_run_inside_the_model_folder(tmp_path, tiny_dir, capsys):
    ckpt = Path(shutil.copytree(tiny_dir, tmp_path / "model"))

    rc = cli.main(["report", "--model", str(ckpt), "--device", "cpu", "--out", str(ckpt / "reports"), "--force",
                   "--notebooks-dir", str(FIXTURES), "--only", "01"])

    assert rc == 0, capsys.readouterr().err
    (run_dir,) = (ckpt / "reports").iterdir()
    assert (run_dir / "index.html").is_file() and (run_dir / "metrics" / "01_ok.json").is_file()


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write into: mode 0555, or for root (which ignores modes) a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("below", [False, True], ids=["out", "parent-of-out"])
def test_read_only_out_is_one_line(tiny_dir, capsys, monkeypatch, read_only, below):
    monkeypatch.setattr(report, "execute", lambda *a, **k: pytest.fail("a notebook ran"))
    out = read_only / "reports" if below else read_only

    rc = cli.main(["report", "--model", str(tiny_dir), "--device", "cpu", "--out", str(out)])

    assert rc == 2
    err = one_line_error(capsys)
    assert err.startswith(f"qwenlab report: error: --out {out}: cannot create a run folder there"), err
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_timeout_must_be_positive_seconds(tmp_path, capsys, no_notebook, value):
    assert cli.main(["report", "--timeout", value, "--out", str(tmp_path / "reports")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwenlab report: error: argument --timeout:") and value in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "reports").exists()
