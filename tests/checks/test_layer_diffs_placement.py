"""Notebook 03's runs on the tiny fixture (CPU): a sequential run (one model at a time) and a layer-mapped qwenlab
model give the resident run's diff; the plan is made before loading; a candidate dump needs only the references."""
import pytest

from qwenlab.activations.floors import Gates
from qwenlab.checks import placement as pl
from qwenlab.checks.nbutil import load_thresholds
from qwenlab.errors import QwenlabError
from qwenlab.memory.plan import DeviceMemory, Plan
from qwenlab.model.spec import LoadSpec

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "chat:What is the capital of France?"]
GATES = Gates.from_thresholds(load_thresholds(None, "03_layer_diffs"))
SPEC = LoadSpec(dtype="float32", device="cpu")


def _summary(run):
    return [(d.label, d.ids, d.result.passed, d.result.compared, round(max(r["rel_l2"] for r in d.result.rows
                                                                           if r["rel_l2"] == r["rel_l2"]), 12))
            for d in run.diffs]


def test_sequential_and_mapped_give_the_resident_diff():
    resident = pl.run_layer_diffs(SPEC, PROMPTS, pl.plan_for(SPEC, PROMPTS), GATES)
    assert resident.plan.placement == "resident" and "qwenlab load" in resident.seconds
    sequential_plan = pl.plan_for(SPEC, PROMPTS, placement="sequential")
    sequential = pl.run_layer_diffs(SPEC, PROMPTS, sequential_plan, GATES)
    assert sequential.plan.placement == "sequential"
    assert set(sequential.seconds) == {"reference (float32)", "qwenlab"}  # float32: the reference is the truth
    mapped_spec = SPEC.with_(device_map="cpu:0-1,cpu:2-3")
    mapped = pl.run_layer_diffs(mapped_spec, PROMPTS, pl.plan_for(mapped_spec, PROMPTS), GATES)
    assert _summary(resident) == _summary(sequential) == _summary(mapped)
    assert all(d.result.passed for d in resident.diffs) and resident.localised["localised"].all()
    assert all(d.isolated is not None and not d.isolated["exceeds"].any() for d in resident.diffs)
    metrics = pl.placement_metrics(sequential)
    assert metrics["placement"]["placement"] == "sequential" and metrics["placement"]["qwenlab_bytes"] > 0


def test_planted_bugs_run_under_every_placement():
    run = pl.run_layer_diffs(SPEC, PROMPTS[:1], pl.plan_for(SPEC, PROMPTS, placement="sequential"), GATES)
    assert run.localised is not None and run.localised["localised"].all()


def test_a_candidate_runs_against_the_references_alone(tiny, tmp_path):
    from qwenlab.activations.capture import capture_to_file

    ids = tiny.tokenizer.encode(PROMPTS[0])
    dump = capture_to_file(tiny, ids, "qwenlab", tmp_path / "cand.safetensors")
    plan = pl.plan_for(SPEC, PROMPTS, placement="sequential")
    run = pl.run_layer_diffs(SPEC, PROMPTS, plan, GATES, candidate=str(dump))
    assert len(run.diffs) == 1 and run.diffs[0].result.passed and run.candidate_meta["impl"] == "qwenlab"
    assert set(run.seconds) == {"reference (float32)"} and run.localised is None


def test_plans_that_cannot_run_stop_before_loading():
    with pytest.raises(QwenlabError, match="only resident runs take a quantized model"):
        pl.plan_for(SPEC.with_(quant="nvfp4"), PROMPTS, placement="sequential")
    with pytest.raises(QwenlabError, match="placement split"):
        pl.plan_for(SPEC, PROMPTS, placement="split")


def test_the_plan_reads_well():
    plan = Plan("split", 66 * 10 ** 9, 66 * 10 ** 9, [DeviceMemory("cuda:0", 79 * 10 ** 9, 80 * 10 ** 9),
                                                     DeviceMemory("cuda:1", 79 * 10 ** 9, 80 * 10 ** 9)],
                131 * 10 ** 9, True, ["cuda:0"] * 32 + ["cuda:1"] * 32)
    text = plan.describe()
    assert "placement: split" in text and "qwenlab layers: cuda:0 0-31, cuda:1 32-63" in text
    assert "79.0 GB free of 80.0" in text and "the float32 reference 131.00 GB" in text


def test_a_candidate_that_declares_what_it_does_not_produce_passes(tiny, tmp_path):
    """A layer-0-only dump (logits declared not produced, as `capture --include` writes it) passes the report's
    notebook 03 as `qwenlab diff` passes it: no logits gate on logits it never claimed to have."""
    from qwenlab.activations.capture import capture_to_file
    from qwenlab.checks import layer_diffs as ld

    ids = tiny.tokenizer.encode(PROMPTS[0])
    dump = capture_to_file(tiny, ids, "qwenlab", tmp_path / "layer0.safetensors", include=["embed", "layers.0.*"])
    thresholds = load_thresholds(None, "03_layer_diffs")
    run = pl.run_layer_diffs(SPEC, PROMPTS, pl.plan_for(SPEC, PROMPTS, placement="sequential"), GATES,
                             candidate=str(dump))
    summary, table = ld.summary_frame(run.diffs), ld.worst_frame(run.diffs)
    metrics, reasons = ld.verdict(thresholds, dtype=run.dtype, diffs=run.diffs, summary=summary, table=table,
                                  logits=ld.pooled_logits(run.diffs), localised=ld.pd.DataFrame(columns=["localised"]),
                                  gates=GATES, plant_bugs=False, candidate=str(dump),
                                  candidate_meta=run.candidate_meta, config_hash=tiny.config.config_hash())
    assert reasons == [] and metrics["logits"] == {}
    declared = run.diffs[0].result.coverage.not_produced
    assert "logits" in declared and "layers.1.input" in declared


def test_a_float32_nvfp4_run_is_compared_in_bfloat16_and_passes():
    """transformers dequantizes NVFP4 weights through bfloat16, so its float32 run has bf16 weights: against the
    float32 floor (1e-5) a correct qwenlab failed every tensor. Compared in bfloat16 with measured floors it passes,
    and the planted bugs are still each found at their tensor."""
    spec = SPEC.with_(quant="nvfp4")
    run = pl.run_layer_diffs(spec, PROMPTS[:1], pl.plan_for(spec, PROMPTS[:1]), GATES)
    assert run.dtype == "bfloat16" and any("compared in bfloat16" in note for note in run.plan.notes)
    assert set(run.seconds) >= {"truth (reference, float32)", "reference (bfloat16)"}
    diff = run.diffs[0]
    assert diff.noise.measured and diff.result.passed and not diff.isolated["exceeds"].any()
    assert run.localised["localised"].all()
