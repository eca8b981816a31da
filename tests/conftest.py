import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from qwenlab.model.loader import load  # noqa: E402
from qwenlab.model.tiny import ensure_tiny, verify, write_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dir():
    return ensure_tiny()


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-untied", "tiny-untied")


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory):
    """The tiny Qwen3-MoE fixture (3 layers, layer 0 dense, 8 experts, 2 per token), byte-checked."""
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-moe", "tiny-moe")
    verify(path, "tiny-moe")
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load(tiny_dir, "float32", "cpu")


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir):
    from qwenlab.activations.reference import load_reference

    return load_reference(tiny_dir)


@pytest.fixture(scope="session")
def moe(moe_dir):
    return load(moe_dir, "float32", "cpu")


@pytest.fixture(scope="session")
def moe_ref(moe_dir):
    from qwenlab.activations.reference import load_reference

    return load_reference(moe_dir)
