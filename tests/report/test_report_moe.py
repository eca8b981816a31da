"""`qwenlab report` on the tiny MoE: the notebooks where MoE changes what is checked (layer diffs with routing, NVFP4
with transformers on qwenlab's dequantized experts as the quantized reference), judged on metrics.json values.
(Decoding: tests/model.)"""
import json

import pytest

from qwenlab.cli import main


@pytest.fixture(scope="module")
def report(tmp_path_factory, moe_dir):
    out = tmp_path_factory.mktemp("reports")
    code = main(["report", "--model", str(moe_dir), "--out", str(out), "--only", "03,06"])
    (run,) = [d for d in out.iterdir() if d.is_dir() and d.name != "latest"]  # --only leaves latest alone
    return code, json.loads((run / "metrics.json").read_text())["notebooks"]


def test_report_on_the_tiny_moe_passes(report):
    code, nb = report
    assert code == 0, {name: n["reasons"] for name, n in nb.items()}
    layers = nb["03_layer_diffs"]["metrics"]
    assert layers["first_divergence"] is None and layers["max_rel_l2"] < 1e-5
    assert layers["routing"]["agreement_min"] == 1.0 and layers["routing"]["flips"] == 0
    assert [row["layer"] for row in layers["routing"]["layers"]] == [1, 2]
    assert layers["planted_localised"] == layers["planted_total"] == 7
    assert {"layers.1.mlp.router_weights", "layers.1.mlp.router_ids", "layers.2.mlp.experts"} <= \
        {bug["expected"] for bug in layers["planted"].values()}
    nvfp4 = nb["06_nvfp4_quantization"]["metrics"]
    assert "qwenlab's dequantized numbers" in nvfp4["quantized_reference_note"]
    assert nvfp4["quantized_reference"]["ran"] is True and nvfp4["quantized_reference"]["first_divergence"] is None
    assert nvfp4["unquantized_reference"]["ran"] is True
    assert nvfp4["planted_localised"] == nvfp4["planted_total"] == 3


def test_report_on_the_tiny_moe_in_bfloat16_passes(tmp_path, moe_dir):
    """bf16 flips experts at near-ties (in transformers as in qwenlab): notebook 06's isolated errors and notebook
    04's steps leave those tokens out (doc/moe.md) and judge the rest. It had regressed at layers.1.mlp.experts
    (isolated, 2.9x its floor) and at one decode step (rel_l2 0.27 against 0.085)."""
    code = main(["report", "--model", str(moe_dir), "--out", str(tmp_path), "--dtype", "bfloat16",
                 "--only", "04,06"])
    (run,) = [d for d in tmp_path.iterdir() if d.is_dir() and d.name != "latest"]
    nb = json.loads((run / "metrics.json").read_text())["notebooks"]
    assert code == 0, {name: n["reasons"] for name, n in nb.items()}
    decode = nb["04_decode_kv_parity"]["metrics"]
    assert decode["step_limits"]["measured"] and decode["routing_near_tie_steps"] > 0
    assert nb["06_nvfp4_quantization"]["metrics"]["quantized_reference"]["isolated_max_ratio"] < 1


def test_notebook_03_forces_a_near_tie_flip_and_passes(tmp_path, moe_dir):
    """Quantized at load and run in bfloat16, the tiny MoE flips one token's experts at layer 1 at a near-tie (margin
    0.016). Without forcing, every tensor after it at that token failed (layers.1.mlp.experts 2.7x its floor, logits
    KL mean 0.16); with the reference's experts forced there the tensors compare like with like, the flip is still
    reported, and the planted bugs are still all found."""
    code = main(["report", "--model", str(moe_dir), "--out", str(tmp_path), "--dtype", "bfloat16",
                 "--quant", "nvfp4", "--only", "03"])
    (run,) = [d for d in tmp_path.iterdir() if d.is_dir() and d.name != "latest"]
    nb = json.loads((run / "metrics.json").read_text())["notebooks"]["03_layer_diffs"]
    assert code == 0, nb["reasons"]
    layers = nb["metrics"]
    assert layers["routing"]["flips"] >= 1 and layers["routing"]["clear_margin_flips"] == 0
    assert len(layers["forced_routing"]) == layers["routing"]["flips"]
    assert layers["first_divergence"] is None and layers["max_ratio_to_floor"] < 1
    assert layers["planted_localised"] == layers["planted_total"] == 7
