"""The one handler every command's exceptions go through (qwenlab.errors.run_command), and the inputs that used to
end in a traceback from deep inside: a closed pipe, an internal error, a KV cache of terabytes, parse-time nonsense,
three first-use builds of the fixture at once."""
import json
import shutil
import subprocess
import sys

import pytest

from qwenlab.cli import main
from qwenlab.errors import DEBUG_ENV, run_command


def test_an_internal_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("deep inside torch\nsecond line")

    assert run_command("generate", broken, None) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("qwenlab generate: internal error: RuntimeError: deep inside torch (run again with --debug or "
                   f"{DEBUG_ENV}=1 for the traceback, and please report it)")
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert run_command("generate", broken, None) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_closed_pipe_exits_quietly(tiny_dir):
    text = "word " * 2000
    done = subprocess.run(f"set -o pipefail; {sys.executable} -m qwenlab tokenize --model {tiny_dir} --text '{text}'"
                          " | head -c 10 > /dev/null", shell=True, capture_output=True, text=True,
                          executable="/bin/bash")
    assert done.returncode == 141 and done.stderr == ""


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "--temperature: 'nan' is not a finite number"),
    (["--temperature", "-1"], "--temperature: -1 is outside [0.0, inf]"),
    (["--seed", str(2 ** 64)], "--seed: 18446744073709551616 is outside [0, 9223372036854775807]"),
    (["--max-new-tokens", "0"], "--max-new-tokens: 0 is outside [1, inf]"),
    (["--top-p", "0"], "--top-p: 0 is outside (0.0, 1.0]"),
    (["--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
])
def test_nonsense_values_are_refused_at_parse_time(capsys, argv, message):
    assert main(["generate", "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_kv_cache_that_cannot_fit_is_one_line(tiny_dir, tmp_path, capsys):
    huge = tmp_path / "huge-context"
    shutil.copytree(tiny_dir, huge)
    config = json.loads((huge / "config.json").read_text())
    config["max_position_embeddings"] = 10 ** 12
    (huge / "config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(huge), "--prompt", "Hello there", "--max-new-tokens", str(10 ** 11),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a KV cache of" in err and "GiB is free on cpu" in err and "\n" not in err


def test_three_first_use_builds_at_once(tmp_path):
    target = tmp_path / "tiny-qwen3"
    code = f"from qwenlab.model.tiny import ensure_tiny; ensure_tiny({str(target)!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert (target / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-qwen3"]  # no temp folder left behind
