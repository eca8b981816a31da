"""A one-token prompt cannot show a position bug: RoPE skipped passes every tensor there. `qwenlab diff` says so
(text and JSON) from the dumps' prompt_ids; the same bug on the golden run's 4 tokens fails at q_rope."""
import json
import os
import re

import numpy as np
import pytest
import torch

from qwenlab.activations.dump import read_dump, write_dump
from qwenlab.activations.prompt_check import MIN_TOKENS, position_warning
from qwenlab.activations.reference import capture_reference
from qwenlab.cli import main
from qwenlab.paths import DATA_DIR, REPO_ROOT

GOLDEN = DATA_DIR / "golden" / "tiny-qwen3_reference.safetensors"
DOC = REPO_ROOT / "doc" / "numpy_forward.md"
SENTENCE = "The quick brown fox jumps over the lazy dog."
SENTENCE_IDS = [785, 3974, 13876, 38835, 34208, 916, 279, 15678, 5562, 13]


def test_position_warning_by_length():
    assert "identity" in position_warning(1) and str(MIN_TOKENS) in position_warning(1)
    assert "only 4 tokens" in position_warning(4)
    assert position_warning(MIN_TOKENS) is None and position_warning(None) is None


def numpy_forward(skip_rope: bool):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace = {"__name__": "numpy_forward_doc"}
    exec(code, namespace)
    if skip_rope:
        namespace["rope_cos_sin"] = lambda T, head_dim, theta: (np.ones((T, head_dim), np.float32),
                                                                 np.zeros((T, head_dim), np.float32))
    return namespace["forward"]


def dump(path, tensors: dict, ids: list[int]):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
               for k, v in tensors.items()}
    return os.fspath(write_dump(path, tensors, {"prompt_ids": ids, "dtype": "float32"}))


def diff(capsys, cand, ref, *flags):
    code = main(["diff", cand, ref, *flags])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def one_token_ref(tiny_ref, tmp_path_factory):
    ids = read_dump(GOLDEN).prompt_ids[:1]
    return dump(tmp_path_factory.mktemp("ref") / "ref1.safetensors", capture_reference(tiny_ref, ids), ids)


def test_rope_skipped_passes_on_one_token_and_the_diff_warns(tiny_dir, one_token_ref, tmp_path, capsys):
    ids = read_dump(GOLDEN).prompt_ids[:1]
    cand = dump(tmp_path / "no_rope.safetensors", numpy_forward(skip_rope=True)(tiny_dir, ids), ids)
    code, text = diff(capsys, cand, one_token_ref)
    headline, warning = text.splitlines()[:2]
    assert code == 0 and "PASS" in headline
    assert warning.startswith("warning: the prompt is 1 token: RoPE at position 0 is the identity")
    code, out = diff(capsys, cand, one_token_ref, "--json")
    result = json.loads(out)
    assert result["prompt_tokens"] == 1 and result["prompt_warning"] == position_warning(1)


def test_rope_skipped_fails_at_q_rope_on_more_tokens(tiny_dir, tmp_path, capsys):
    ids = read_dump(GOLDEN).prompt_ids
    cand = dump(tmp_path / "no_rope.safetensors", numpy_forward(skip_rope=True)(tiny_dir, ids), ids)
    code, out = diff(capsys, cand, os.fspath(GOLDEN), "--json")
    result = json.loads(out)
    assert code == 1 and result["first_divergence"] == "layers.0.attn.q_rope"
    assert result["prompt_warning"] == position_warning(4)


def test_no_warning_from_a_sentence(tiny, tiny_ref, tiny_dir, tmp_path, capsys):
    assert tiny.tokenizer.encode(SENTENCE) == SENTENCE_IDS
    ref = dump(tmp_path / "ref.safetensors", capture_reference(tiny_ref, SENTENCE_IDS), SENTENCE_IDS)
    cand = dump(tmp_path / "cand.safetensors", numpy_forward(skip_rope=False)(tiny_dir, SENTENCE_IDS), SENTENCE_IDS)
    code, text = diff(capsys, cand, ref)
    assert code == 0 and "PASS" in text.splitlines()[0] and "warning" not in text
    code, out = diff(capsys, cand, ref, "--json")
    assert json.loads(out)["prompt_warning"] is None and json.loads(out)["prompt_tokens"] == 10


def test_capture_of_a_short_prompt_writes_the_dump_then_warns(tiny_dir, tmp_path, capsys):
    out = tmp_path / "short.safetensors"
    assert main(["capture", "--model", str(tiny_dir), "--prompt", "hi", "--impl", "qwenlab", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {out}") and read_dump(out).prompt_ids
    warning = position_warning(len(read_dump(out).prompt_ids))
    assert warning and captured.err.strip().splitlines() == [f"qwenlab capture: warning: {warning}"]
