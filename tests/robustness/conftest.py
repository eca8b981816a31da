"""Bad input, one class per file: each case runs the command (qwenlab.cli.main) or the function the CLI calls and
checks the exit code, that an error is exactly one line on stderr, and what is on disk afterwards."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from qwenlab.cli import main
from qwenlab.model.quantize import quantize_checkpoint


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (exit code, stdout, stderr stripped)."""
    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err.strip()
    return run


@pytest.fixture
def fails(cli):
    """fails(*argv, needles=(...)) -> the one-line error of `qwenlab argv...` (exit 2), each needle in it."""
    def run(*argv, needles=()):
        code, _, err = cli(*argv)
        assert code == 2, (code, err)
        assert len(err.splitlines()) == 1 and err.startswith(f"qwenlab {argv[0]}: error: "), err
        for needle in needles:
            assert needle in err, err
        return err
    return run


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    """A fresh copy of the tiny fixture to corrupt."""
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


@pytest.fixture(scope="session")
def nvfp4_ct(tmp_path_factory, tiny_dir):
    """The tiny fixture written as a compressed-tensors NVFP4 checkpoint (input scales from 2 texts)."""
    root = tmp_path_factory.mktemp("robust-nvfp4")
    return quantize_checkpoint(tiny_dir, root / "ct", "compressed-tensors", calibration_texts_n=2, device="cpu")["dst"]


def _rewrite_weights(folder, edit, name="model.safetensors"):
    path = folder / name
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def rewrite_weights():
    """rewrite_weights(folder, edit(tensors), name="model.safetensors"): the file saved again after edit."""
    return _rewrite_weights


@pytest.fixture
def edit_json():
    """edit_json(path, edit(data)): the JSON file written again after edit changed data in place."""
    return _edit_json
