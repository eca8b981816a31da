"""`qwenlab quantize` reads nothing outside SRC, keeps permissions, never writes into SRC and leaves no temp folder."""
import os
import stat

import pytest

from qwenlab.errors import QwenlabError
from qwenlab.model.quantize import check_paths


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_side_files_links_and_permissions(ckpt, tmp_path, cli):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    secret.chmod(0o600)
    (ckpt / "README.md").symlink_to(secret)
    (ckpt / "docs").mkdir()
    (ckpt / "docs" / "notes.md").write_text("inside")
    (ckpt / "NOTES.md").symlink_to(os.path.join("docs", "notes.md"))
    (ckpt / "tokenizer_config.json").chmod(0o600)
    (ckpt / "config.json").chmod(0o640)
    dst = tmp_path / "dst"
    code, out, err = cli("quantize", ckpt, dst, "--calibrate", "0", "--device", "cpu")
    assert code == 0, err
    assert err == f"warning: README.md not copied: it links to {secret}, outside {ckpt}"
    assert not (dst / "README.md").exists() and (dst / "NOTES.md").read_text() == "inside"
    assert mode(dst / "tokenizer_config.json") == 0o600 and mode(dst / "generation_config.json") == 0o644
    assert mode(dst / "config.json") == 0o640 and mode(dst / "model.safetensors") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dst", "secret.txt"]  # no temp folder left


@pytest.mark.parametrize("where", ["inside", "same", "link"])
def test_dst_inside_or_equal_to_src_is_refused(ckpt, tmp_path, fails, where):
    before = sorted(p.name for p in ckpt.iterdir())
    dst = {"inside": ckpt / "nvfp4", "same": ckpt, "link": tmp_path / "link"}[where]
    if where == "link":
        dst.symlink_to(ckpt)
    needle = "the destination is the source checkpoint" if where != "inside" else "is inside the checkpoint folder"
    fails("quantize", ckpt, dst, "--calibrate", "0", needles=(needle,))
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_force_allows_a_dst_inside_src_but_never_src_itself(ckpt):
    check_paths(ckpt, ckpt / "nvfp4", force=True)
    with pytest.raises(QwenlabError, match="the destination is the source checkpoint"):
        check_paths(ckpt, ckpt, force=True)
