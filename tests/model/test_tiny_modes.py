"""`qwenlab tiny` writes files any user may read, as a plain open() would under the umask (safetensors alone: 0600)."""
import os
import stat

import pytest

from qwenlab.cli import main


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=oct)
def test_tiny_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert main(["tiny", str(tmp_path / "m"), "--preset", "tiny-untied"]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o666 & ~mask}, modes
