"""`qwenlab report --candidate` refuses, before anything runs, a dump the reference could not be run for."""
import pytest
import torch

from qwenlab.activations.dump import write_dump
from qwenlab.cli import main
from qwenlab.report import run as report


@pytest.mark.parametrize("metadata, words", [({}, "no prompt_ids"), ({"prompt_ids": []}, "no prompt_ids"),
                                             (None, "not a readable safetensors dump")])
def test_candidate_without_prompt_ids_exits_2(tmp_path, tiny_dir, monkeypatch, capsys, metadata, words):
    monkeypatch.setattr(report, "execute", lambda *a, **k: pytest.fail("a notebook ran"))
    cand = tmp_path / "cand.safetensors"
    if metadata is None:
        cand.write_bytes(b"not a dump")
    else:
        write_dump(cand, {"embed": torch.zeros(2, 4)}, metadata)
    out = tmp_path / "reports"
    assert main(["report", "--model", str(tiny_dir), "--only", "03", "--candidate", str(cand), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qwenlab report: error: --candidate {cand}") and words in err and len(err.splitlines()) == 1
    assert not out.exists()
