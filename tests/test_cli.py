"""The issue's walk-through commands, end to end, with their JSON keys."""
import json
import subprocess
import sys

from qwenlab.cli import main
from qwenlab.model.tiny import checkpoint_digest, expected_digest


def _json(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_tiny_is_byte_identical_across_runs(tmp_path):
    main(["tiny", str(tmp_path / "a")])
    proc = subprocess.run([sys.executable, "-m", "qwenlab", "tiny", str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint_digest(tmp_path / "a") == checkpoint_digest(tmp_path / "b") == expected_digest("tiny")


def test_tiny_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    assert main(["tiny", str(tmp_path / "a")]) == 2
    assert (tmp_path / "a" / "keep.txt").read_text() == "mine"


def test_tokenize_chat_json(tiny_dir, capsys):
    code, out = _json(capsys, "tokenize", "--model", str(tiny_dir), "--text", "你好, UFO?", "--chat", "--json")
    assert code == 0
    assert out["ids"][:3] == [151644, 872, 198] and out["ids"][-3:] == [151644, 77091, 198]
    assert 151645 in out["ids"]


def test_generate_json_keys_and_stop(tiny_dir, capsys):
    code, out = _json(capsys, "generate", "--model", str(tiny_dir), "--prompt", "Have you ever seen a UFO?", "--chat",
                      "--max-new-tokens", "16", "--temperature", "0", "--json")
    assert code == 0
    assert {"prompt_ids", "ids", "text", "stop_reason"} <= set(out)
    assert len(out["ids"]) == 16 and out["stop_reason"] == "max_new_tokens"
    code, out = _json(capsys, "generate", "--model", str(tiny_dir), "--prompt", "Hello<|im_end|>", "--json")
    assert out["ids"] == [151645] and out["stop_reason"] == "stop_token"


def test_capture_both_and_diff(tmp_path, tiny_dir, capsys):
    cand, ref = tmp_path / "cand.safetensors", tmp_path / "ref.safetensors"
    for impl, out in (("qwenlab", cand), ("reference", ref)):
        assert main(["capture", "--model", str(tiny_dir), "--prompt", "Hello", "--impl", impl, "--out", str(out)]) == 0
    capsys.readouterr()
    code, result = _json(capsys, "diff", str(cand), str(ref), "--json")
    assert code == 0
    assert result["first_divergence"] is None
    assert {"rows", "first_divergence", "logits"} <= set(result)
    assert len(result["rows"]) == 2 + 18 * 4 + 1
    assert result["logits"]["top1_agreement"] == 1.0


def test_diff_exit_code_is_1_at_a_planted_tensor(tmp_path, tiny_dir, capsys):
    from qwenlab.activations.dump import read_dump, write_dump

    cand, ref = tmp_path / "cand.safetensors", tmp_path / "ref.safetensors"
    main(["capture", "--model", str(tiny_dir), "--prompt", "Hello there", "--impl", "reference", "--out", str(ref)])
    dump = read_dump(ref)
    dump.tensors["layers.2.attn.v_proj"] = dump.tensors["layers.2.attn.v_proj"] * 1.001
    write_dump(cand, dump.tensors, dump.metadata)
    capsys.readouterr()
    code, result = _json(capsys, "diff", str(cand), str(ref), "--json")
    assert code == 1 and result["first_divergence"] == "layers.2.attn.v_proj"
    flagged = [r["name"] for r in result["rows"] if r["exceeds"]]
    assert flagged == ["layers.2.attn.v_proj"]


def test_capture_metadata(tmp_path, tiny_dir, capsys):
    from qwenlab.activations.dump import read_dump

    out = tmp_path / "c.safetensors"
    main(["capture", "--model", str(tiny_dir), "--prompt", "Hello", "--impl", "qwenlab", "--out", str(out)])
    meta = read_dump(out).metadata
    assert meta["prompt_ids"] == [9707]
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["producer"].startswith("qwenlab")
    assert len(meta["config_hash"]) == 16 and "torch" in meta["versions"]
