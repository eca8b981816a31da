"""Bad input: a clear one-line error naming the thing at fault and a non-zero exit, never a traceback."""
import json
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file

from qwenlab.cli import main


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    assert "\n" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def _rewrite_weights(ckpt, edit):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(tmp_path, tiny_dir, capsys):
    ckpt = _copy(tiny_dir, tmp_path / "m")
    _rewrite_weights(ckpt, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    code, err = _run(capsys, "generate", "--model", str(ckpt), "--prompt", "hi")
    _assert_one_line_error(code, err, "model.layers.2.mlp.up_proj.weight", "missing")


def test_wrong_shape(tmp_path, tiny_dir, capsys):
    ckpt = _copy(tiny_dir, tmp_path / "m")
    _rewrite_weights(ckpt, lambda t: t.update({"model.layers.1.self_attn.k_norm.weight": t["model.norm.weight"].clone()}))
    code, err = _run(capsys, "capture", "--model", str(ckpt), "--prompt", "hi", "--impl", "qwenlab",
                     "--out", str(tmp_path / "x.safetensors"))
    _assert_one_line_error(code, err, "model.layers.1.self_attn.k_norm.weight", "[64]", "[32]")
    assert not (tmp_path / "x.safetensors").exists()


def test_truncated_safetensors(tmp_path, tiny_dir, capsys):
    ckpt = _copy(tiny_dir, tmp_path / "m")
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, err = _run(capsys, "generate", "--model", str(ckpt), "--prompt", "hi")
    _assert_one_line_error(code, err, "model.safetensors", "truncated")


def test_truncated_shard_of_a_sharded_checkpoint(tmp_path, untied_dir, capsys):
    ckpt = _copy(untied_dir, tmp_path / "m")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    code, err = _run(capsys, "generate", "--model", str(ckpt), "--prompt", "hi")
    _assert_one_line_error(code, err, shard.name)


def test_non_qwen3_config(tmp_path, tiny_dir, capsys):
    ckpt = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    code, err = _run(capsys, "generate", "--model", str(ckpt), "--prompt", "hi")
    _assert_one_line_error(code, err, "config.json", "llama", "not Qwen3")


def test_prompt_longer_than_context(tiny_dir, capsys):
    code, err = _run(capsys, "generate", "--model", str(tiny_dir), "--prompt", "hello " * 5000)
    _assert_one_line_error(code, err, "max_position_embeddings=4096", "5001 tokens")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_dir, capsys):
    ckpt = _copy(tiny_dir, tmp_path / "m")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, err = _run(capsys, "generate", "--model", str(ckpt), "--prompt", "hi")
    _assert_one_line_error(code, err, "pickle", "arbitrary code")


def test_missing_model_dir_and_bad_dtype(tmp_path, tiny_dir, capsys):
    code, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    _assert_one_line_error(code, err, "nope")
    code, err = _run(capsys, "generate", "--model", str(tiny_dir), "--prompt", "hi", "--dtype", "float8")
    _assert_one_line_error(code, err, "--dtype", "float8")


def test_diff_of_a_corrupt_dump_names_the_file(tmp_path, capsys):
    bad = tmp_path / "cand.safetensors"
    bad.write_bytes(b"\x00" * 10)
    code, err = _run(capsys, "diff", str(bad), str(bad))
    _assert_one_line_error(code, err, "cand.safetensors")


def test_capture_does_not_overwrite_on_failure(tmp_path, tiny_dir, capsys):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    code, err = _run(capsys, "capture", "--model", str(tiny_dir), "--prompt", "The quick brown fox", "--impl",
                     "qwenlab", "--out", str(out))
    _assert_one_line_error(code, err, "exists and is not an activation dump")  # refused before the model runs
    assert out.read_bytes() == b"precious"
    dump = tmp_path / "dump.safetensors"
    assert _run(capsys, "capture", "--model", str(tiny_dir), "--prompt", "The quick brown fox", "--impl", "qwenlab",
                "--out", str(dump))[0] == 0
    before = dump.read_bytes()
    code, err = _run(capsys, "capture", "--model", str(tiny_dir), "--prompt", "", "--impl", "qwenlab",
                     "--out", str(dump))
    _assert_one_line_error(code, err, "empty")
    assert dump.read_bytes() == before  # a failed capture leaves the old dump as it was


def test_python_dash_m_reports_errors_the_same_way(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qwenlab", "tokenize", "--model", str(tmp_path), "--text", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "tokenizer" in proc.stderr


def test_tiny_on_a_disk_without_room_says_so_before_writing(tmp_path, capsys, monkeypatch):
    """`qwenlab tiny --preset qwen3-32b` (62 GiB) on the GPU machine's 64 GiB disk: one line, nothing written."""
    from collections import namedtuple

    from qwenlab.quant import writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10, 9, 1))
    code, err = _run(capsys, "tiny", str(tmp_path / "t"), "--preset", "tiny")
    _assert_one_line_error(code, err, f"{tmp_path / 't'}: not enough disk space to write this checkpoint", "TMPDIR")
    assert list(tmp_path.iterdir()) == []
