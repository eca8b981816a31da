"""Notebook 03's placements on the tiny fixture (CPU): sequential (one model at a time, through dumps) and a
layer-mapped qwenlab model give the resident run's diff; the plan is made before loading."""
import pytest

from qwenlab.checks import placement as pl
from qwenlab.errors import QwenlabError
from qwenlab.memory.plan import DeviceMemory, Plan

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "chat:What is the capital of France?"]


def _summary(run):
    return [(d.label, d.ids, d.result.passed, d.result.compared, round(max(r["rel_l2"] for r in d.result.rows
                                                                           if r["rel_l2"] == r["rel_l2"]), 12))
            for d in run.diffs]


def test_sequential_and_split_give_the_resident_diff(tiny_dir, tmp_path):
    resident = pl.run_layer_diffs(tiny_dir, "float32", "cpu", PROMPTS, pl.plan_for(tiny_dir, "float32", "cpu", PROMPTS),
                                  tmp_path / "a")
    assert resident.plan.placement == "resident" and resident.ckpt is not None
    sequential_plan = pl.plan_for(tiny_dir, "float32", "cpu", PROMPTS, placement="sequential")
    sequential = pl.run_layer_diffs(tiny_dir, "float32", "cpu", PROMPTS, sequential_plan, tmp_path / "b")
    assert sequential.plan.placement == "sequential" and sequential.ckpt is None
    assert set(sequential.seconds) == {"qwenlab", "reference"}
    assert list((tmp_path / "b").glob("*.safetensors")) == []  # the dumps are removed once diffed
    mapped = pl.run_layer_diffs(tiny_dir, "float32", "cpu", PROMPTS, pl.plan_for(tiny_dir, "float32", "cpu", PROMPTS),
                                tmp_path / "c", device_map="cpu:0-1,cpu:2-3")
    assert mapped.ckpt.model.layer_devices == ["cpu"] * 4
    assert _summary(resident) == _summary(sequential) == _summary(mapped)
    assert all(d.result.passed for d in resident.diffs)
    metrics = pl.placement_metrics(sequential)
    assert metrics["placement"]["placement"] == "sequential" and metrics["placement"]["qwenlab_bytes"] > 0


def test_a_candidate_runs_sequentially_against_the_reference_alone(tiny_dir, tiny, tmp_path):
    from qwenlab.activations.capture import capture_to_file

    ids = tiny.tokenizer.encode(PROMPTS[0])
    dump = capture_to_file(tiny, ids, "qwenlab", tmp_path / "cand.safetensors")
    plan = pl.plan_for(tiny_dir, "float32", "cpu", PROMPTS, placement="sequential")
    run = pl.run_layer_diffs(tiny_dir, "float32", "cpu", PROMPTS, plan, tmp_path / "d", candidate=str(dump))
    assert len(run.diffs) == 1 and run.diffs[0].result.passed and run.candidate_meta["impl"] == "qwenlab"
    assert set(run.seconds) == {"reference"}


def test_plans_that_cannot_run_stop_before_loading(tiny_dir):
    with pytest.raises(QwenlabError, match="only resident runs take a quantized model"):
        pl.plan_for(tiny_dir, "float32", "cpu", PROMPTS, placement="sequential", quant="nvfp4")
    with pytest.raises(QwenlabError, match="placement split"):
        pl.plan_for(tiny_dir, "float32", "cpu", PROMPTS, placement="split")


def test_the_plan_reads_well():
    plan = Plan("split", 66 * 10 ** 9, 66 * 10 ** 9, [DeviceMemory("cuda:0", 79 * 10 ** 9, 80 * 10 ** 9),
                                                     DeviceMemory("cuda:1", 79 * 10 ** 9, 80 * 10 ** 9)],
                ["cuda:0"] * 32 + ["cuda:1"] * 32)
    text = plan.describe()
    assert "placement: split" in text and "qwenlab layers: cuda:0 0-31, cuda:1 32-63" in text
    assert "79.0 GB free of 80.0" in text
