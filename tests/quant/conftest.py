import pytest

from qwenlab.model.loader import load
from qwenlab.model.quantize import quantize_checkpoint


@pytest.fixture(scope="session")
def tiny_nvfp4(tiny_dir):
    """The tiny fixture quantized at load (every decoder linear, lm_head kept)."""
    return load(tiny_dir, "float32", "cpu", quant="nvfp4")


@pytest.fixture(scope="session")
def nvfp4_dirs(tmp_path_factory, tiny_dir):
    """`qwenlab quantize` of the tiny fixture in both layouts: {"modelopt": dir, "compressed-tensors": dir}."""
    root = tmp_path_factory.mktemp("nvfp4")
    return {fmt: quantize_checkpoint(tiny_dir, root / fmt, fmt, device="cpu")["dst"]
            for fmt in ("modelopt", "compressed-tensors")}
