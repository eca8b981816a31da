"""Notebook 06's logic: planted NVFP4 interop bugs named at the first quantized tensor against the quantized reference
(transformers on the same NVFP4 numbers) and far above honest noise against the unquantized one, while honest NVFP4
stays under the floor stored in data/thresholds/06_nvfp4_quantization.json; the llama-perplexity statistics against
a direct computation."""
import math

import pytest
import torch

from qwenlab.activations.floors import Gates
from qwenlab.activations.nvfp4_reference import load_reference_for
from qwenlab.activations.planted_nvfp4 import first_quantized_point, nvfp4_bugs
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks import nbutil
from qwenlab.checks import nvfp4_kl as kl
from qwenlab.checks import nvfp4_quantization as nq
from qwenlab.model.loader import load

pytest.importorskip("compressed_tensors")
PROMPT = "The quick brown fox jumps over the lazy dog."
THRESHOLDS = nbutil.load_thresholds(None, "06_nvfp4_quantization")


@pytest.fixture(scope="module")
def quantized(tiny_dir):
    return load(tiny_dir, "float32", "cpu", quant="nvfp4")


@pytest.fixture(scope="module")
def references(quantized):
    return (load_reference_for(quantized, "quantized", dtype=torch.bfloat16),
            load_reference_for(quantized, "quantized", dtype=torch.float32),
            load_reference_for(quantized, "unquantized"))


@pytest.fixture(scope="module")
def views(quantized, references):
    ref_q, truth_q, ref_u = references
    model, tok, floor = quantized.model, quantized.tokenizer, THRESHOLDS["unquantized_floor"]
    gates = Gates.from_thresholds(THRESHOLDS["quantized_reference"])
    diffs_q = ld.diff_prompts(model, ref_q, tok, [PROMPT], gates, truth_model=truth_q, dtype=nq.compare_dtype(model))
    diffs_u = ld.diff_prompts(model, ref_u, tok, [PROMPT], gates, overrides=nq.unquantized_floors(floor))
    return diffs_q, diffs_u


def test_honest_nvfp4_stays_under_both_floors(views):
    diffs_q, diffs_u = views
    assert diffs_q[0].result.first_divergence is None and diffs_u[0].result.first_divergence is None
    summary = nq.diff_summary(diffs_q, Gates.from_thresholds(THRESHOLDS["quantized_reference"]))
    assert summary["isolated_first_divergence"] is None and summary["max_ratio_to_floor"] < 1
    assert summary["logits"]["kl_mean"] < summary["logits_limits"]["kl_mean"]
    q_proj = next(r for r in diffs_u[0].result.rows if r["name"] == "layers.0.attn.q_proj")
    assert 0.02 < q_proj["rel_l2"] < 0.2  # NVFP4 noise: visible, and far under the floor


def test_planted_bugs_are_named_and_stand_above_the_noise(quantized, views):
    diffs_q, diffs_u = views
    result = nq.planted(quantized.model, diffs_q[0].ids, diffs_q[0].reference, diffs_u[0].reference,
                        THRESHOLDS["unquantized_floor"], diffs_u[0].result)
    frame = result.frame
    assert list(frame.index) == ["nibble order swapped", "block scale applied twice", "tensor scale inverted"]
    assert (frame["expected"] == "layers.0.attn.q_proj").all() and frame["localised"].all()
    assert (frame["found_vs_unquantized"] == "layers.0.attn.q_proj").all()
    assert (frame["times_honest_noise"] >= THRESHOLDS["min_planted_times_honest"]).all()
    assert frame.loc["nibble order swapped", "rel_l2_vs_quantized"] == pytest.approx(1.4, abs=0.3)


def test_excluding_the_first_module_moves_the_expected_tensor(tiny_dir):
    model = load(tiny_dir, "float32", "cpu", quant="nvfp4",
                 exclude=["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]).model
    assert first_quantized_point(model) == "layers.0.attn.v_proj"
    assert {b.expected for b in nvfp4_bugs(model)} == {"layers.0.attn.v_proj"}


def test_planted_bugs_leave_the_model_alone(quantized):
    ids = quantized.tokenizer.encode(PROMPT)
    before = quantized.model(torch.tensor(ids))
    after = [bug.capture(quantized.model, ids)["logits"] for bug in nvfp4_bugs(quantized.model)]
    assert torch.equal(quantized.model(torch.tensor(ids)), before)
    assert all(not torch.allclose(a, before[0]) for a in after)


def test_kl_statistics_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    ids = [3, 1, 4, 1, 5, 9, 2]
    ref_logits, cand_logits = torch.randn(7, 11, generator=gen), torch.randn(7, 11, generator=gen)
    stats = kl.PositionStats()
    stats.add(cand_logits, kl.ReferenceSide.from_logits(ref_logits, ids), ids)
    s = stats.summary()
    p, q = torch.softmax(ref_logits.double(), -1), torch.softmax(cand_logits.double(), -1)
    direct_kl = (p * (p.log() - q.log())).sum(-1)
    assert s["kl_mean"] == pytest.approx(direct_kl.mean().item(), rel=1e-5)
    assert s["kl_max"] == pytest.approx(direct_kl.max().item(), rel=1e-5)
    assert s["same_top1_pct"] == pytest.approx(100 * (p.argmax(-1) == q.argmax(-1)).double().mean().item())
    nxt = torch.tensor(ids[1:])
    dp = q[torch.arange(6), nxt] - p[torch.arange(6), nxt]
    assert s["delta_p_rms"] == pytest.approx(dp.pow(2).mean().sqrt().item(), rel=1e-5)
    ppl_ratio = math.exp((-(q[torch.arange(6), nxt].log()) + p[torch.arange(6), nxt].log()).mean().item())
    assert s["ppl_ratio"] == pytest.approx(ppl_ratio, rel=1e-5)


def test_corpus_and_verdict_pass_on_honest_nvfp4(quantized, references, views):
    ref_u = references[2]
    diffs_q, diffs_u = views
    corpus = kl.Corpus.build(ref_u, [quantized.tokenizer.encode("Water boils at one hundred degrees.")],
                             kl.perplexity_ids(quantized.tokenizer, 64))
    stats = corpus.stats(quantized.model)
    assert stats["positions"] > 64 and stats["ppl_tokens"] == 64 and 0 < stats["kl_mean"]
    weights = nq.weight_errors(quantized.model, quantized.path)
    assert len(weights) == 28 and weights["nmse_db"].between(-25, -15).all()
    memory = nq.memory_check(quantized.model, THRESHOLDS["weights_rel_error_max"])
    metrics, reasons = nq.verdict(THRESHOLDS, info=quantized.model.quantization, weights=weights, quantized=diffs_q,
                                  unquantized=diffs_u, corpus_stats=stats, variant_frame=None, planted_frame=None,
                                  memory=memory)
    assert reasons == [] and metrics["quantized_reference"]["first_divergence"] is None
    assert metrics["memory"][0]["rel_error"] == 0


def test_planted_bugs_without_the_quantized_reference(quantized, views):
    """Where compressed-tensors is missing (the GPU machine): the unquantized reference's noise floor names them."""
    _, diffs_u = views
    frame = nq.planted(quantized.model, diffs_u[0].ids, None, diffs_u[0].reference, THRESHOLDS["unquantized_floor"],
                       diffs_u[0].result).frame
    assert frame["localised"].all() and "rel_l2_vs_quantized" not in frame


def test_perplexity_of_a_random_large_model_saturates_instead_of_overflowing():
    from qwenlab.checks.nvfp4_kl import PositionStats

    stats = PositionStats(kl=[0.1], same_top1=[True], delta_p=[0.0], nll_candidate=[900.0, 901.0],
                        nll_reference=[899.0, 900.0])
    summary = stats.summary()
    assert summary["ppl_candidate"] == float("inf") and summary["ppl_reference"] == float("inf")
    assert abs(summary["ppl_ratio"] - 2.718281828) < 1e-6


def free_memory(monkeypatch, config, fits: str):
    """Fake free memory for notebook 06's references: room for the bfloat16 reference of PROMPT but not the float32
    one (fits='bfloat16'), or for neither (fits='none')."""
    from qwenlab.memory.plan import HEADROOM, DeviceMemory, model_bytes

    tokens = 16
    need = {dtype: model_bytes(config, dtype, tokens)[1] for dtype in ("bfloat16", "float32")}
    assert need["bfloat16"] < need["float32"]
    usable = (need["bfloat16"] + need["float32"]) / 2 if fits == "bfloat16" else need["bfloat16"] / 2
    monkeypatch.setattr(nq, "visible_devices", lambda device: [DeviceMemory("cpu", int(usable / HEADROOM), 1 << 40)])
    return tokens


def test_section_2_without_room_for_the_float32_reference_uses_the_fixed_limits_and_says_why(quantized,
                                                                                             monkeypatch):
    import weakref

    model, tok = quantized.model, quantized.tokenizer
    tokens = free_memory(monkeypatch, model.config, "bfloat16")
    assert nq.longest(tok, [PROMPT]) <= tokens
    refs = nq.quantized_references(quantized, "bfloat16", tokens)
    assert refs.reference is not None and refs.truth is None and refs.error is None and refs.skipped is None
    assert refs.floors.startswith("floors not measured: the float32 quantized reference needs ")
    assert refs.floors.endswith("free beside qwenlab's model and the quantized reference; the fixed limits apply")
    gates = Gates.from_thresholds(THRESHOLDS["quantized_reference"])
    diffs = nq.quantized_diffs(model, refs, tok, [PROMPT], gates, "bfloat16")
    held = weakref.ref(refs.reference)
    refs.release()
    assert held() is None  # the diffs keep the captures, not the model
    assert not diffs[0].noise.measured and diffs[0].isolated is None
    memory = nq.memory_check(model, THRESHOLDS["weights_rel_error_max"])
    metrics, reasons = nq.verdict(THRESHOLDS, info=model.quantization, weights=None, quantized=diffs,
                                  unquantized=None, corpus_stats=None, variant_frame=None, planted_frame=None,
                                  memory=memory, notes=nq.reference_notes(refs, nq.References("cpu")))
    q = metrics["quantized_reference"]
    assert q["ran"] and q["floors"] == refs.floors and metrics["notes"] == {"quantized_floors": refs.floors}
    assert q["logits_limits"] == {stat: limits["bfloat16"]
                                  for stat, limits in THRESHOLDS["quantized_reference"]["unmeasured_logits"].items()}
    assert reasons == []  # honest NVFP4 within the fixed limits
    assert refs.lines("the quantized reference") == [refs.floors]


def test_references_that_do_not_fit_skip_their_sections_and_the_verdict_still_runs(quantized, monkeypatch):
    model, tok = quantized.model, quantized.tokenizer
    tokens = free_memory(monkeypatch, model.config, "none")
    refs_q = nq.quantized_references(quantized, "bfloat16", tokens)
    refs_u = nq.unquantized_reference(model, quantized.path, tokens)
    gates = Gates.from_thresholds(THRESHOLDS["quantized_reference"])
    assert refs_q.reference is None and refs_q.skipped.startswith("the quantized reference needs ")
    assert refs_u.reference is None and refs_u.skipped.startswith("the unquantized reference needs ")
    assert nq.quantized_diffs(model, refs_q, tok, [PROMPT], gates, "bfloat16") is None
    assert nq.unquantized_diffs(model, refs_u, tok, [PROMPT], gates, THRESHOLDS["unquantized_floor"]) is None
    assert nq.corpus_reference(refs_u, [tok.encode(PROMPT)], tok.encode(PROMPT)) is None
    memory = nq.memory_check(model, THRESHOLDS["weights_rel_error_max"])
    metrics, reasons = nq.verdict(THRESHOLDS, info=model.quantization, weights=None, quantized=None,
                                  unquantized=None, corpus_stats=None, variant_frame=None, planted_frame=None,
                                  memory=memory, notes=nq.reference_notes(refs_q, refs_u))
    assert metrics["quantized_reference"] == {"ran": False, "skipped": refs_q.skipped}
    assert metrics["unquantized_reference"] == {"ran": False, "skipped": refs_u.skipped}
    assert reasons == []
    assert refs_q.lines("the quantized reference") == [f"the quantized reference skipped: {refs_q.skipped}"]


def test_section_2_out_of_memory_drops_the_float32_reference_then_the_section(monkeypatch):
    calls = []

    def diff_prompts(model, ref, tok, prompts, gates, truth_model=None, dtype=None):
        calls.append(truth_model)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(nq, "diff_prompts", diff_prompts)
    refs = nq.References("cpu", reference=object(), truth=object(), floors=nq.FLOORS_MEASURED)
    truth = refs.truth
    assert nq.quantized_diffs(None, refs, None, [PROMPT], None, "bfloat16") is None
    assert calls == [truth, None]  # once with the float32 reference, once without it
    assert refs.reference is None and refs.truth is None
    assert refs.floors.startswith("floors not measured: the layer diff with the float32 quantized reference resident "
                                  "ran out of memory (CUDA out of memory.")
    assert refs.skipped == ("the layer diff against the quantized reference ran out of memory (CUDA out of memory. "
                            "Tried to allocate 1.00 GiB)")

    monkeypatch.setattr(nq, "diff_prompts", lambda *a, truth_model=None, **kw: (
        ["diffs without the truth"] if truth_model is None else diff_prompts(*a, truth_model=truth_model, **kw)))
    refs = nq.References("cpu", reference=object(), truth=object(), floors=nq.FLOORS_MEASURED)
    assert nq.quantized_diffs(None, refs, None, [PROMPT], None, "bfloat16") == ["diffs without the truth"]
    assert refs.reference is not None and refs.truth is None and refs.skipped is None
    assert refs.floors.startswith("floors not measured:") and refs.floors.endswith("the fixed limits apply")
