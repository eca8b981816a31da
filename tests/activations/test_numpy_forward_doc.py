"""doc/numpy_forward.md's forward is complete and right: its code block (the file doc/numpy_forward.py, verbatim),
executed on the tiny fixture with the golden run's prompt_ids, gives every canonical tensor of transformers' float32
run (data/golden/) to float32 rounding, and its dump passes `qwenlab diff` against that run. The mistakes table of
doc/dump-format.md is this forward with each mistake planted, diffed against transformers."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.dump import read_dump
from qwenlab.activations.names import canonical_names
from qwenlab.activations.reference import capture_reference
from qwenlab.cli import main
from qwenlab.paths import DATA_DIR, REPO_ROOT

DOC = REPO_ROOT / "doc" / "numpy_forward.md"
SCRIPT = REPO_ROOT / "doc" / "numpy_forward.py"
GOLDEN = DATA_DIR / "golden" / "tiny-qwen3_reference.safetensors"


def doc_code() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    return block


@pytest.fixture(scope="module")
def doc_forward():
    namespace = {"__name__": "numpy_forward_doc"}
    exec(compile(doc_code(), str(DOC), "exec"), namespace)
    return namespace["forward"]


def rel_l2(cand: np.ndarray, ref: np.ndarray) -> float:
    c, r = cand.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(np.linalg.norm(c - r) / np.linalg.norm(r))


def test_the_doc_shows_the_file_verbatim():
    assert doc_code() == SCRIPT.read_text()


def test_every_canonical_tensor_matches_the_golden_run(doc_forward, tiny_dir):
    golden = read_dump(GOLDEN)
    out = doc_forward(tiny_dir, golden.prompt_ids)
    assert list(out) == canonical_names(4)
    for name, ref in golden.tensors.items():
        assert out[name].dtype == np.float32, name
        assert tuple(out[name].shape) == tuple(ref.shape), name
        assert rel_l2(out[name], ref.numpy()) < 1e-5, name


def test_its_dump_passes_qwenlab_diff(tiny_dir, tmp_path, capsys):
    golden = read_dump(GOLDEN)
    (tmp_path / "ids.json").write_text(json.dumps({"ids": golden.prompt_ids, "tokens": []}))  # tokenize --json's form
    dump = tmp_path / "numpy.safetensors"
    done = subprocess.run([sys.executable, os.fspath(SCRIPT), os.fspath(tiny_dir), "ids.json", os.fspath(dump)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_dump(dump).prompt_ids == golden.prompt_ids
    code = main(["diff", os.fspath(dump), os.fspath(GOLDEN), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["verdict"] == "pass" and result["dtype"] == "float32"
    assert result["coverage"]["complete"] and result["coverage"]["compared"] == len(canonical_names(4))
    assert max(row["rel_l2"] for row in result["rows"]) < 1e-5


SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun."


def attention_variant(kv_head, causal: bool = True, scale: bool = True):
    def attention(q, k, v):
        T, heads, D = q.shape
        future = np.triu(np.ones((T, T), dtype=bool), k=1)
        context = np.empty_like(q)
        for h in range(heads):
            g = kv_head(h, heads, k.shape[1])
            scores = (q[:, h] @ k[:, g].T) * (np.float32(D ** -0.5) if scale else np.float32(1))
            scores = np.where(future, -np.inf, scores) if causal else scores
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            context[:, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[:, g]
        return context.reshape(T, heads * D)
    return attention


def mistakes(ns) -> dict:
    """The rows of dump-format.md's "What a wrong step looks like", each as a replacement in the doc's namespace."""
    rope, rms_norm = ns["rope_cos_sin"], ns["rms_norm"]

    def no_rope(T, D, theta):
        cos, sin = rope(T, D, theta)
        return np.ones_like(cos), np.zeros_like(sin)

    def interleaved_rotate(x):
        y = np.empty_like(x)
        y[..., 0::2], y[..., 1::2] = -x[..., 1::2], x[..., 0::2]
        return y

    def interleaved_rope(T, D, theta):
        return tuple(np.repeat(t[:, :D // 2], 2, axis=-1) for t in rope(T, D, theta))

    def swapped_sign(x):
        x1, x2 = np.split(x, 2, axis=-1)
        return np.concatenate([x2, -x1], axis=-1)

    grouped = lambda h, heads, kv_heads: h // (heads // kv_heads)  # noqa: E731
    return {
        "RoPE skipped": {"rope_cos_sin": no_rope},
        "no causal mask": {"attention": attention_variant(grouped, causal=False)},
        "no `head_dim^-0.5` scale": {"attention": attention_variant(grouped, scale=False)},
        "`rotate_half` as `cat(x2, -x1)`": {"rotate_half": swapped_sign},
        "interleaved-pair RoPE (GPT-J)": {"rotate_half": interleaved_rotate, "rope_cos_sin": interleaved_rope},
        "`rope_theta` 10000 instead of the config's": {"rope_cos_sin": lambda T, D, theta: rope(T, D, 10000.0)},
        "KV head `h % kv_heads`": {"attention": attention_variant(lambda h, heads, kv_heads: h % kv_heads)},
        "RMSNorm `(1 + w) * x`": {"rms_norm": lambda x, w, eps: rms_norm(x, 1 + w, eps)},
    }


def mistake_table() -> dict[str, tuple[str, str]]:
    section = (REPO_ROOT / "doc" / "dump-format.md").read_text().split("**What a wrong step looks like.**")[1]
    section = section.split("\n\n")[1]  # the table, after its caption paragraph
    return {row[0]: (row[1], row[2]) for row in re.findall(r"^\| (.+?) \| (.+?) \| (.+?) \|$", section, flags=re.M)
            if row[0] not in ("mistake", "---")}


def test_the_planted_mistake_table_of_dump_format(tiny, tiny_ref, tiny_dir):
    """Each mistake, planted in the doc's forward, is caught (or not, at 1 token) where and how the table says."""
    ids = tiny.tokenizer.encode(SENTENCE)
    table = mistake_table()
    for column, T in enumerate((1, 8)):
        reference = capture_reference(tiny_ref, ids[:T])
        for mistake, cells in table.items():
            ns = {"__name__": "numpy_forward_doc"}
            exec(doc_code(), ns)
            planted = mistakes(ns)
            assert list(planted) == list(table)
            ns.update(planted[mistake])
            out = {name: torch.from_numpy(np.ascontiguousarray(t))
                   for name, t in ns["forward"](tiny_dir, ids[:T]).items()}
            result = diff_dumps(out, reference, dtype="float32")
            row, cell = result.first_divergence_row, cells[column]
            if cell == "passes":
                assert result.passed, (mistake, T, row and row["name"])
                continue
            name, value = re.fullmatch(r"`(\S+)` ([0-9.]+)", cell).groups()
            assert row["name"] == name and f"{row['rel_l2']:.2g}" == f"{float(value):.2g}", (mistake, T, row)
