"""Floors measured, not guessed (doc/floors.md): the reference's own noise (its dtype vs float32) sets each tensor's
floor, and the isolated (teacher-forced) errors find a bug confined to one deep layer that the accumulated diff,
riding on bf16 noise, cannot see. On a 24-layer fixture run in bfloat16 on the CPU."""
import pytest
import torch

from qwenlab.activations import planted
from qwenlab.activations.floors import Gates, Noise, isolated_errors, measure
from qwenlab.activations.reference import load_reference
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks.nbutil import load_thresholds
from qwenlab.model.loader import load
from qwenlab.model.tiny import write_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog while the band plays on."
GATES = Gates.from_thresholds(load_thresholds("", "03_layer_diffs"))


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-deep", "tiny-deep")
    ckpt = load(path, "bfloat16", "cpu")
    return ckpt, load_reference(path, torch.bfloat16, "cpu"), load_reference(path, torch.float32, "cpu")


def _diff(deep, replace=None):
    ckpt, ref, truth = deep
    ids = ckpt.tokenizer.encode(PROMPT)
    return ld.prompt_diff(ld.capture_prompt(ckpt.model, ref, truth, ids, "p", replace=replace), "bfloat16", GATES)


def test_a_correct_bf16_model_is_inside_its_measured_budget(deep):
    d = _diff(deep)
    assert d.noise.measured and d.noise.tensors["logits"] > 1e-3  # bf16 noise is real at 24 layers
    assert d.result.passed and ld.first_isolated(d.isolated) is None
    ratios = [r["rel_l2"] / r["floor"] for r in d.result.rows]
    assert max(ratios) < 1 and d.isolated["ratio"].max() < 1
    floors = [r["floor"] for r in d.result.rows if r["name"].startswith("layers.")]
    assert max(floors) > 10 * min(floors)  # measured per tensor, not one number per dtype


def test_a_bug_in_one_deep_layer_is_named_by_the_isolated_errors(deep):
    ckpt = deep[0]
    subtle = _diff(deep, planted.rope_theta_off_in_layer(ckpt.model, 17, 1.5))
    assert subtle.result.first_divergence is None  # the accumulated diff is blind to it: bf16 noise at depth 17
    assert ld.first_isolated(subtle.isolated) == "layers.17.attn.q_rope"
    assert 1 < subtle.isolated.loc["layers.17.attn.q_rope", "ratio"]
    assert (subtle.isolated.drop(index=[n for n in subtle.isolated.index if n.startswith("layers.17.")])["ratio"]
            < 1).all()  # the other layers, fed the right inputs, stay inside their budget
    blunt = _diff(deep, planted.skip_norm(17, "k"))
    assert blunt.result.first_divergence == ld.first_isolated(blunt.isolated) == "layers.17.attn.k_norm"


def test_gates_follow_the_thresholds():
    noise = Noise("bfloat16", {"a": 0.01, "b": 0.0})
    assert GATES.floors(noise, ["a", "b"]) == pytest.approx({"a": 4 * 0.01 + 0.002, "b": 0.002})
    assert GATES.floors(Noise("float32"), ["a"]) == {"a": 1e-5}
    unmeasured = GATES.floors(Noise("bfloat16", measured=False), ["layers.0.output", "logits"])
    assert unmeasured["logits"] == 0.1 and 0.03 < unmeasured["layers.0.output"] <= 0.1
    limits = GATES.logits_limits({"kl_mean": 0.01, "kl_p99": 0.1, "top1_disagreement": 0.0, "delta_p_max": 0.1},
                                 "bfloat16")
    assert limits["kl_mean"] == pytest.approx(8 * 0.01 + 1e-5) and limits["top1_disagreement"] == 0.05
    assert GATES.logits_limits({}, "float32")["kl_mean"] == 1e-6


def test_isolated_errors_compare_the_layer_update_on_the_residual():
    x = torch.randn(5, 8)
    update = 1e-3 * torch.randn(5, 8)
    truth = {"layers.0.input": x, "layers.0.output": x + update, "layers.0.mlp.act": update}
    wrong = {"layers.0.input": x, "layers.0.output": x + 2 * update, "layers.0.mlp.act": update}
    errors = isolated_errors(wrong, truth)
    assert errors["layers.0.output"] == pytest.approx(1.0, abs=1e-3)  # 100% of the update, not 0.1% of the residual
    assert errors["layers.0.mlp.act"] == 0 and "layers.0.input" not in errors
    assert measure(truth, None, "bfloat16").measured is False


def test_isolated_moe_errors_leave_out_a_token_flipped_at_a_near_tie():
    """A teacher-forced MoE layer whose token 2 took expert 3 instead of expert 1, whose router logits were 0.01
    apart: that token's experts output differs by far more than rounding, and is left out of the layer's
    `mlp.experts` and `output` errors; the same flip at a clear margin (2.0) is kept, and fails."""
    torch.manual_seed(0)
    T, E, H = 6, 4, 8
    logits = torch.randn(T, E)
    logits[2] = torch.tensor([0.0, 1.0, -1.0, 0.99])
    ids = logits.topk(1).indices
    flipped = ids.clone()
    flipped[2] = 3
    inputs, experts = torch.randn(T, H), torch.randn(T, H)
    truth = {"layers.1.input": inputs, "layers.1.mlp.router_logits": logits, "layers.1.mlp.router_ids": ids,
             "layers.1.mlp.experts": experts, "layers.1.output": inputs + experts}
    other = experts.clone()
    other[2] = torch.randn(H)  # another expert's output for token 2
    cand = {**truth, "layers.1.mlp.router_ids": flipped, "layers.1.mlp.experts": other,
            "layers.1.output": inputs + other}
    errors = isolated_errors(cand, truth, routing_margin=0.03125)
    assert errors["layers.1.mlp.experts"] == 0.0 and errors["layers.1.output"] == 0.0
    assert errors["layers.1.mlp.router_logits"] == 0.0

    clear = logits.clone()
    clear[2] = torch.tensor([0.0, 3.0, -1.0, 1.0])
    truth_clear = {**truth, "layers.1.mlp.router_logits": clear}
    errors = isolated_errors({**cand, "layers.1.mlp.router_logits": clear}, truth_clear, routing_margin=0.03125)
    assert errors["layers.1.mlp.experts"] > 0.3 and errors["layers.1.output"] > 0.3
