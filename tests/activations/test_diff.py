import json
import math

import pytest
import torch

from qwenlab.activations.diff import diff_dumps, floor_for, logits_metrics, rel_l2_grid, styled, tensor_metrics
from qwenlab.activations.dump import Dump
from qwenlab.activations.names import canonical_names, forward_order_key, split_name
from qwenlab.errors import QwenlabError

T, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 5, 64, 4, 2, 32, 128, 1000, 3
POINT_SHAPES = {
    "attn.q_proj": (T, HEADS * HEAD_DIM), "attn.k_proj": (T, KV_HEADS * HEAD_DIM),
    "attn.v_proj": (T, KV_HEADS * HEAD_DIM), "attn.q_norm": (T, HEADS, HEAD_DIM),
    "attn.k_norm": (T, KV_HEADS, HEAD_DIM), "attn.q_rope": (T, HEADS, HEAD_DIM),
    "attn.k_rope": (T, KV_HEADS, HEAD_DIM), "attn.context": (T, HEADS * HEAD_DIM),
    "mlp.gate_proj": (T, INTER), "mlp.up_proj": (T, INTER), "mlp.act": (T, INTER),
    "logits": (T, VOCAB),
}


def synthetic(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in canonical_names(LAYERS):
        shape = POINT_SHAPES.get(split_name(name)[1], (T, HIDDEN))
        tensors[name] = torch.randn(shape, generator=gen).to(dtype)
    return tensors


def perturb(tensor, relative, seed=1):
    base = tensor.double()
    noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (base + relative * base.norm() * noise / noise.norm()).to(tensor.dtype)


def test_names_forward_order():
    names = canonical_names(2)
    assert names[:3] == ["embed", "layers.0.input", "layers.0.input_layernorm"]
    assert names[-3:] == ["layers.1.output", "norm", "logits"] and len(names) == 3 + 2 * 18
    shuffled = sorted(names + ["zzz", "aaa"], key=lambda n: (hash(n) % 7, n))
    assert sorted(shuffled, key=forward_order_key) == names + ["aaa", "zzz"]
    assert sorted(["layers.10.input", "layers.2.output"], key=forward_order_key)[0] == "layers.2.output"
    assert split_name("layers.3.attn.q_norm") == (3, "attn.q_norm") and split_name("embed") == (None, "embed")


def test_exact_copy_passes():
    ref = synthetic()
    result = diff_dumps({k: v.clone() for k, v in ref.items()}, ref)
    assert result.passed and result.first_divergence is None
    assert all(row["rel_l2"] == 0 and row["status"] == "ok" for row in result.rows)
    assert [row["name"] for row in result.rows] == canonical_names(LAYERS)
    assert result.dtype == "float32" and result.logits["top1_agreement"] == 1.0


def test_first_divergence_with_propagation():
    ref = synthetic()
    names = canonical_names(LAYERS)
    start = names.index("layers.1.attn.k_norm")
    cand = {n: perturb(t, 1e-3) if names.index(n) >= start else t.clone() for n, t in ref.items()}
    result = diff_dumps(cand, ref)
    assert result.first_divergence == "layers.1.attn.k_norm" and not result.passed
    assert result.first_divergence_row["rel_l2"] == pytest.approx(1e-3, rel=1e-2)
    assert all(row["exceeds"] for row in result.rows[start:])


def test_isolated_divergence_flags_only_that_tensor():
    ref = synthetic()
    cand = dict(ref, **{"layers.2.mlp.act": perturb(ref["layers.2.mlp.act"], 1e-3)})
    result = diff_dumps(cand, ref)
    assert result.first_divergence == "layers.2.mlp.act"
    assert [row["name"] for row in result.rows if row["exceeds"]] == ["layers.2.mlp.act"]


def test_float32_noise_below_floor_passes():
    ref = synthetic()
    result = diff_dumps({n: perturb(t, 1e-7) for n, t in ref.items()}, ref)
    assert result.passed
    assert max(row["rel_l2"] for row in result.rows) < 1e-5


def test_bfloat16_floor_grows_with_depth():
    ref = Dump(synthetic(torch.bfloat16), {"dtype": "bfloat16"})
    small = Dump(dict(ref.tensors, **{"layers.0.output": perturb(ref.tensors["layers.0.output"], 1e-2)}),
                 {"dtype": "bfloat16"})
    assert diff_dumps(small, ref).passed
    big = Dump(dict(ref.tensors, **{"layers.0.output": perturb(ref.tensors["layers.0.output"], 0.2)}),
               {"dtype": "bfloat16"})
    result = diff_dumps(big, ref)
    assert result.dtype == "bfloat16" and result.first_divergence == "layers.0.output"
    assert floor_for("layers.0.input", "bfloat16", 36) < floor_for("layers.35.output", "bfloat16", 36)
    assert floor_for("layers.35.output", "bfloat16", 36) == pytest.approx(0.1)
    assert floor_for("embed", "bf16", 36) == 0.03 and floor_for("logits", "torch.bfloat16", 36) == 0.1


def test_floor_overrides_and_unknown_dtype():
    assert floor_for("logits", "float32", 3) == 1e-5
    assert floor_for("norm", "float16", 36) == pytest.approx(0.1 / 8)
    overrides = {"float32": 2e-5, "layers.*.attn.q_rope": 1e-4}
    assert floor_for("layers.2.attn.q_rope", "float32", 3, overrides) == 1e-4
    assert floor_for("layers.2.attn.k_rope", "float32", 3, overrides) == 2e-5
    assert floor_for("layers.2.attn.k_rope", "bfloat16", 3, overrides) == pytest.approx(0.1)
    with pytest.raises(QwenlabError, match="nvfp4"):
        floor_for("embed", "nvfp4", 3)


def test_missing_names_are_listed_and_pass_only_when_allowed():
    ref = synthetic()
    cand = {n: t for n, t in ref.items() if n != "layers.0.attn.q_rope"}
    cand["layers.0.attn.extra_probe"] = torch.zeros(2)
    result = diff_dumps(cand, ref)
    assert not result.passed and result.verdict == "incomplete" and result.first_divergence is None
    assert diff_dumps(cand, ref, allow_missing=True).passed
    assert result.only_in_reference == ["layers.0.attn.q_rope"]
    assert result.only_in_candidate == ["layers.0.attn.extra_probe"]
    row = next(r for r in result.rows if r["name"] == "layers.0.attn.q_rope")
    assert row["status"] == "only_in_reference" and math.isnan(row["rel_l2"]) and not row["exceeds"]


def test_shape_reshape_mismatch_and_nan():
    ref = synthetic()
    cand = dict(ref)
    cand["layers.0.attn.q_norm"] = ref["layers.0.attn.q_norm"].reshape(T, HEADS * HEAD_DIM)
    cand["layers.0.attn.k_proj"] = torch.zeros(T, 3)
    bad = ref["layers.1.mlp.act"].clone()
    bad[0, 0] = float("nan")
    cand["layers.1.mlp.act"] = bad
    result = diff_dumps(cand, ref)
    status = {row["name"]: row["status"] for row in result.rows}
    assert status["layers.0.attn.q_norm"] == "ok"
    assert status["layers.0.attn.k_proj"] == "shape_mismatch"
    assert status["layers.1.mlp.act"] == "nonfinite"
    assert result.first_divergence == "layers.0.attn.k_proj" and not result.passed
    assert sum(row["exceeds"] for row in result.rows) == 2
    json.dumps(result.to_json_dict(), allow_nan=False)


def test_different_prompts_rejected():
    ref = synthetic()
    with pytest.raises(QwenlabError, match="different prompts"):
        diff_dumps(Dump(ref, {"prompt_ids": [1, 2, 3]}), Dump(ref, {"prompt_ids": [1, 2, 4]}))
    assert diff_dumps(Dump(ref, {"prompt_ids": [1, 2]}), Dump(ref, {})).passed


def test_metrics_hand_computed():
    m = tensor_metrics(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert m["max_abs"] == pytest.approx(1.0) and m["mean_abs"] == pytest.approx(1 / 3)
    assert m["rel_l2"] == pytest.approx(1 / math.sqrt(14))
    assert m["cosine"] == pytest.approx(11 / (3 * math.sqrt(14)))
    assert m["nmse_db"] == pytest.approx(10 * math.log10(1 / 14))
    same = tensor_metrics(torch.ones(3), torch.ones(3, dtype=torch.bfloat16))
    assert same["rel_l2"] == 0 and same["nmse_db"] == -math.inf
    zeros = tensor_metrics(torch.zeros(3), torch.zeros(3))
    assert zeros["rel_l2"] == 0 and zeros["cosine"] == 1.0
    assert tensor_metrics(torch.ones(3), torch.zeros(3))["rel_l2"] == math.inf


def test_logits_kl_hand_computed():
    ref = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    cand = torch.tensor([[0.0, 1.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    q0 = 1 / (1 + math.e)
    kl0 = 0.75 * math.log(0.75 / q0) + 0.25 * math.log(0.25 / (1 - q0))
    m = logits_metrics(cand, ref)
    assert m["positions"] == 2
    assert m["kl_per_position"] == pytest.approx([kl0, 0.0], abs=1e-12)
    assert m["kl_mean"] == pytest.approx(kl0 / 2) and m["kl_max"] == pytest.approx(kl0)
    assert m["top1_match_per_position"] == [False, True] and m["top1_agreement"] == 0.5
    assert m["delta_p_max"] == pytest.approx(0.75 - q0)
    assert m["delta_p_mean"] == pytest.approx((0.75 - q0) / 2)


def test_json_frame_grid_and_styler():
    ref = synthetic()
    cand = dict(ref, **{"layers.2.mlp.act": perturb(ref["layers.2.mlp.act"], 1e-3)})
    cand.pop("layers.0.output")
    result = diff_dumps(cand, ref, allow_missing=True)
    payload = result.to_json_dict()
    text = json.dumps(payload, allow_nan=False)
    assert set(payload) == {"rows", "first_divergence", "logits", "only_in_candidate",
                            "only_in_reference", "dtype", "coverage", "verdict", "passed", "same_file", "isolated",
                            "prompt_tokens", "prompt_warning"}
    assert json.loads(text)["first_divergence"] == "layers.2.mlp.act"
    frame = result.to_frame()
    assert frame.index[0] == "embed" and bool(frame.loc["layers.2.mlp.act", "exceeds"])
    grid = rel_l2_grid(result)
    assert list(grid.index) == [0, 1, 2] and list(grid.columns)[:2] == ["input", "input_layernorm"]
    assert grid.loc[2, "mlp.act"] == pytest.approx(1e-3, rel=1e-2) and math.isnan(grid.loc[0, "output"])
    html = styled(frame).to_html()
    assert "font-weight: bold" in html
