"""The temps of atomic writes (qwenlab.atomic) never outlive the write: `qwenlab tiny`, `qwenlab quantize` and a dump
(`qwenlab capture`) stopped by SIGTERM or Ctrl-C remove their temp, say so in one line and exit 130; one killed
outright (kill -9) leaves it, and the next write into that folder removes it (its process is gone) while a live
process's temp stays."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qwenlab.atomic import TEMP_MARK, host_tag, sweep, write_text_atomic
from qwenlab.paths import REPO_ROOT

# Runs a qwenlab command with one step of its write slowed down: once the temp is being filled, the step touches
# a marker file and sleeps, so the test signals a write that is surely under way.
SLOWED = textwrap.dedent("""
    import importlib, pathlib, sys, time
    from qwenlab import cli
    module, name, marker, *argv = sys.argv[1:]
    target = importlib.import_module(module)
    real = getattr(target, name)
    def slowed(*args, **kwargs):
        result = real(*args, **kwargs)
        pathlib.Path(marker).touch()
        time.sleep(600)
        return result
    setattr(target, name, slowed)
    sys.exit(cli.main(argv))
""")

WRITERS = {
    "tiny": ("qwenlab.model.tiny", "write_files", lambda src, dst: ["tiny", str(dst)]),
    "quantize": ("qwenlab.quant.writer", "_write_weights",
                 lambda src, dst: ["quantize", str(src), str(dst), "--calibrate", "0", "--device", "cpu"]),
    "capture": ("safetensors.torch", "save_file",
                lambda src, dst: ["capture", "--model", str(src), "--prompt", "hi", "--impl", "qwenlab", "--device",
                                  "cpu", "--out", str(dst)]),
}


def temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_MARK))


def start_slowed(tmp_path, writer, src, dst):
    module, name, argv = WRITERS[writer]
    marker = tmp_path / "writing"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOWED, module, name, str(marker), *argv(src, dst)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the write never started: {proc.communicate()}")
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_signal_removes_the_temp(tmp_path, tiny_dir, writer, signum):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / ("model.safetensors" if writer == "capture" else "written")
    proc = start_slowed(tmp_path, writer, tiny_dir, dst)
    assert len(temps(out)) == 1  # the write is under way in its temp

    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 130, stderr
    said = "interrupted by SIGTERM" if signum == signal.SIGTERM else "interrupted"
    assert stderr.strip().splitlines() == [f"qwenlab {writer}: {said}"]
    assert stdout == ""
    assert list(out.iterdir()) == []  # neither the temp nor a half-written target


def test_kill_9_leaves_a_temp_the_next_write_sweeps(tmp_path, tiny_dir):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_slowed(tmp_path, "quantize", tiny_dir, out / "first")
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = temps(out)
    assert left.startswith(f"{TEMP_MARK}.{host_tag()}.{proc.pid}.") and left.endswith(".first")
    assert (out / left / "config.json").is_file()  # what the killed write had written so far
    alive = out / f"{TEMP_MARK}.{host_tag()}.{os.getpid()}.abcd1234.busy"  # a write of a live process
    alive.mkdir()
    elsewhere = out / f"{TEMP_MARK}.00000000.{proc.pid}.abcd1234.other-host"  # another host's: pid means nothing here
    elsewhere.mkdir()

    done = subprocess.run([sys.executable, "-m", "qwenlab", "quantize", str(tiny_dir), str(out / "second"),
                           "--calibrate", "0", "--device", "cpu"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1"))

    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([alive.name, elsewhere.name, "second"])
    assert (out / "second" / "config.json").is_file() and not (out / "first").exists()


def test_sweep_removes_only_temps_whose_process_is_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_file = tmp_path / f"{TEMP_MARK}.{host_tag()}.{gone.pid}.abcd1234.metrics.json"
    dead_file.write_text("{")
    mine = tmp_path / f"{TEMP_MARK}.{host_tag()}.{os.getpid()}.abcd1234.metrics.json"
    mine.write_text("{")
    user_file = tmp_path / ".metrics.json.abcd1234.tmp"  # not ours: never touched
    user_file.write_text("{")

    assert sweep(tmp_path) == [dead_file]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, user_file.name])

    sub = tmp_path / "sub"
    sub.mkdir()
    left = sub / dead_file.name
    left.write_text("{")
    write_text_atomic(sub / "index.html", "<p>")  # the first atomic write into a folder sweeps it
    assert sorted(p.name for p in sub.iterdir()) == ["index.html"]
