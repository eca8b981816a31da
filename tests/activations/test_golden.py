"""A stored reference run (data/golden/, made by transformers on the tiny fixture) pins the reference library itself:
a change in transformers' Qwen3 or in the fixture shows up here even when qwenlab and transformers still agree."""

import torch

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.dump import read_dump
from qwenlab.activations.reference import capture_reference
from qwenlab.paths import DATA_DIR

GOLDEN = DATA_DIR / "golden" / "tiny-qwen3_reference.safetensors"


def test_golden_was_made_by_the_reference_on_this_fixture(tiny):
    golden = read_dump(GOLDEN)
    assert golden.metadata["producer"].startswith("transformers")
    assert golden.metadata["config_hash"] == tiny.config.config_hash()
    assert golden.prompt_ids == tiny.tokenizer.encode("Hello, UFO?")


def test_reference_library_still_reproduces_the_golden_run(tiny_ref):
    golden = read_dump(GOLDEN)
    now = capture_reference(tiny_ref, golden.prompt_ids)
    result = diff_dumps(now, golden.tensors, dtype="float32")
    assert result.passed and result.only_in_candidate == [] and result.only_in_reference == []
    assert torch.equal(now["logits"], golden.tensors["logits"].reshape(now["logits"].shape)) or \
        result.logits["kl_max"] < 1e-9


def test_qwenlab_matches_the_golden_run(tiny):
    golden = read_dump(GOLDEN)
    result = diff_dumps(capture_qwenlab(tiny.model, golden.prompt_ids), golden)
    assert result.passed, result.first_divergence_row
