"""Every example command of README.md and doc/*.md runs as written, on the CPU with the tiny model.

Each line of a fenced or indented code block that starts with `qwenlab ` or `python doc/` (also after `&&`) runs in
the order of its file, in one temp folder per file (so a diff finds the dumps the captures above it wrote), and must
exit as its comment states (`# exit 1 ...`; 0 without one; TINY_EXIT where the tiny fixture differs). Adapted for
this machine, and only this: checkpoint placeholders become the tiny fixture (or an NVFP4 copy of it made by
`qwenlab quantize`), `--device cuda` becomes `--device cpu`, `qwenlab report` writes into the temp folder and runs
notebook 02 unless the line names its notebooks (REPORT_ONLY, REPORT_BUDGET; the full report is
tests/report/test_report_real.py), and `qwenlab stress` runs 2 iterations of 1 turn. Lines that cannot run on a CPU
are in SKIPPED with the reason; every other line runs, and a SKIPPED or TINY_EXIT entry that no doc has any more
fails the test.
"""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwenlab.cli import main
from qwenlab.paths import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "doc").glob("*.md"))]
SHELL_FENCES = ("", "bash", "sh", "shell", "console")

SKIPPED = {
    "qwenlab bench --model ~/models/Qwen3-4B-Instruct-2507 --device cuda":
        "a decode benchmark of a GPU against its bandwidth floor (bench on CPU: tests/bench/test_bench.py)",
    "qwenlab bench --model /tmp/q4b --device cuda --dtype bfloat16 [--json] [--out bench.json]":
        "a GPU benchmark of the 4B shape (and a synopsis: optional flags in brackets)",
    "qwenlab tiny /tmp/q4b --preset qwen3-4b":
        "writes the 8 GB Qwen3-4B-shaped checkpoint for the GPU benchmark (qwenlab tiny: tests/test_cli.py)",
    "qwenlab quantize SRC DST [--format compressed-tensors|modelopt] [--exclude PATTERN ...] [--calibrate N]":
        "a synopsis (optional flags in brackets); the quantize example below it runs",
    'qwenlab generate --model DIR --device-map balanced --prompt "Have you ever seen a UFO?" --chat':
        "balances the layers over the visible GPUs (a CPU layer map: tests/model/test_placement.py)",
    'qwenlab capture --model DIR --device-map 0:0-31,1:32-63 --impl qwenlab --prompt "Have you ever seen a UFO?" '
    "--chat --out cand.safetensors":
        "layers over cuda:0 and cuda:1, and a 64-layer model (tests/model/test_placement.py maps cpu ranges)",
    "qwenlab report --model DIR --device-map 0:0-31,1:32-63 -p 03_layer_diffs.placement=split":
        "layers over cuda:0 and cuda:1, and a 64-layer model (tests/checks/test_layer_diffs_placement.py)",
    "qwenlab tiny DIR --preset trained-24l --train-seconds 100 --device cuda":
        "trains 153M parameters for 100 s on a GPU (the training code on the CPU: tests/model/test_train.py)",
}
# Lines whose exit on the tiny random fixture differs from the doc's (which is about a real checkpoint), and why.
TINY_EXIT: dict[str, tuple[int, str]] = {}
# A report line without --only runs notebook 02 here (it loads the model with the line's --dtype/--quant and compares
# it with the reference); the whole report is tests/report/test_report_real.py. Lines naming notebooks run them, with
# these parameters to fit the time budget.
REPORT_ONLY = "02"
REPORT_BUDGET = {"05": ["-p", "05_memory_fluctuation.turns=2", "-p", "05_memory_fluctuation.iterations=2",
                        "-p", "05_memory_fluctuation.max_new_tokens=4"],
                 "06": ["-p", "06_nvfp4_quantization.run_variants=False"]}


def code_lines(text: str) -> list[str]:
    """The lines of shell code blocks: fenced (``` with no or a shell language) and indented by four spaces."""
    lines, fence, indented, previous_blank = [], None, False, True
    for line in text.splitlines():
        opening = re.match(r"\s*(```+|~~~+)\s*(\S*)", line)
        if fence is None and opening:
            fence = opening.groups()
            continue
        if fence is not None:
            if line.strip().startswith(fence[0]):
                fence = None
            elif fence[1] in SHELL_FENCES:
                lines.append(line)
            continue
        indented = line.startswith("    ") and (previous_blank or indented)
        if indented:
            lines.append(line[4:])
        previous_blank = not line.strip()
    return lines


def doc_commands(path: Path) -> dict[str, int]:
    """Command -> the exit code its comment states, in file order: continuation lines joined, `a && b` split."""
    commands, exits, pending = [], {}, ""
    for line in code_lines(path.read_text()):
        pending = (pending + " " + line.strip()).strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        for part in pending.split("&&"):
            if re.match(r"\s*(qwenlab\s|python doc/)", part):
                commands.append(" ".join(shlex.quote(w) if w != ">" else w for w in shlex.split(part, comments=True)))
                exits[commands[-1]] = int(re.search(r"#\s*exit (\d)", part).group(1)) if "# exit" in part else 0
        pending = ""
    return exits


def normal(command: str) -> str:
    return " ".join(shlex.split(command, comments=True))


ALL = {path.name: doc_commands(path) for path in DOCS}
SKIPPED = {normal(k): v for k, v in SKIPPED.items()}
TINY_EXIT = {normal(k): v for k, v in TINY_EXIT.items()}


def adapt(command: str, places: dict[str, str], tmp: Path) -> list[str]:
    words = shlex.split(command)
    words = [places.get(w, w) for w in words]
    words = [re.sub(r"^(unquantized_model=)\S+$", lambda m: m.group(1) + places["~/models/Qwen3-4B-Instruct-2507"], w)
             for w in words]
    for i, w in enumerate(words[:-1]):
        if w == "--device" and words[i + 1].startswith("cuda"):
            words[i + 1] = "cpu"
    if words[:2] == ["qwenlab", "report"]:
        if "--only" not in words:
            words += ["--only", REPORT_ONLY]
        for notebook in words[words.index("--only") + 1].split(","):
            words += REPORT_BUDGET.get(notebook[:2], [])
        words += ["--out", str(tmp / "reports")]
    if words[:2] == ["qwenlab", "stress"]:
        words += ["--iterations", "2", "--turns", "1"]
    return words


def run(words: list[str], cwd: Path) -> tuple[int, str]:
    """A qwenlab line through the CLI's own main() (what the console script calls); a python line in a process."""
    redirect = words[words.index(">") + 1] if ">" in words else None
    words = words[:words.index(">")] if redirect else words
    if words[0] == "python":
        done = subprocess.run([sys.executable, *words[1:]], cwd=cwd, capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(words[1:])
    finally:
        os.chdir(previous)
    if redirect:
        (cwd / redirect).write_text(out.getvalue())
    return code, out.getvalue()[-2000:] + err.getvalue()[-2000:]


@pytest.fixture(scope="module")
def places(tiny_dir, tmp_path_factory):
    """Where each placeholder of the docs points on this machine."""
    root = tmp_path_factory.mktemp("models")
    nvfp4 = root / "tiny-nvfp4"
    assert main(["quantize", str(tiny_dir), str(nvfp4), "--device", "cpu", "--calibrate", "4"]) == 0
    tiny = str(tiny_dir)
    return {"~/models/Qwen3-4B-Instruct-2507": tiny, "$HOME/models/Qwen3-4B-Instruct-2507": tiny, "DIR": tiny,
            "~/models/Qwen3-4B-NVFP4": str(nvfp4), "NVFP4_DIR": str(nvfp4),
            "~/models/Qwen3-4B-qwenlab-nvfp4": str(root / "tiny-qwenlab-nvfp4")}


def prepare(tmp: Path):
    """The temp folder a reader would be in: the repo's doc/ and data/ reachable, FLOORS.json as nvfp4.md says."""
    for name in ("doc", "data"):
        (tmp / name).symlink_to(REPO_ROOT / name)
    (tmp / "FLOORS.json").write_text(json.dumps({"bfloat16": 0.6}))


@pytest.mark.parametrize("doc", [p.name for p in DOCS if any(normal(c) not in SKIPPED for c in ALL[p.name])])
def test_doc_examples_run(doc, places, tmp_path):
    prepare(tmp_path)
    for command in ALL[doc]:
        if normal(command) in SKIPPED:
            continue
        started = time.perf_counter()
        code, output = run(adapt(command, places, tmp_path), tmp_path)
        print(f"{time.perf_counter() - started:6.1f} s  exit {code}  {command}")  # shown by pytest -s or on failure
        expected = TINY_EXIT.get(normal(command), (ALL[doc][command],))[0]
        assert code == expected, f"{doc}: {command}\nexit {code}\n{output}"


def test_every_skip_is_still_in_the_docs():
    found = {normal(c) for commands in ALL.values() for c in commands}
    assert set(SKIPPED) | set(TINY_EXIT) <= found, (set(SKIPPED) | set(TINY_EXIT)) - found


def test_the_examples_are_found():
    readme = list(ALL["README.md"])
    assert readme[0] == "qwenlab report" and any(c.startswith("qwenlab diff cand.safetensors") for c in readme)
    assert len([c for commands in ALL.values() for c in commands]) >= 25
    assert ALL["numpy_forward.md"]["qwenlab diff numpy.safetensors ref.safetensors"] == 0
