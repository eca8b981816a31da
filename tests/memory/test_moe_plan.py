"""MoE in the memory model and the planner: every expert resident, the KV cache unchanged, the 235B-A22B shape
refused before anything loads on one H200 and split across eight."""
import pytest

from qwenlab.errors import QwenlabError
from qwenlab.memory.plan import DeviceMemory, plan
from qwenlab.memory.predict import kv_bytes_per_token, measured_weight_bytes, mlp_width, weight_bytes
from qwenlab.model.config import config_from_dict
from qwenlab.model.loader import load_model
from qwenlab.model.tiny import config_json

GB = 10 ** 9
A3B = config_from_dict(config_json("qwen3-30b-a3b"))
A22B = config_from_dict(config_json("qwen3-30b-a3b", num_hidden_layers=94, hidden_size=4096, intermediate_size=12288,
                                    num_attention_heads=64, moe_intermediate_size=1536))  # Qwen3-235B-A22B


def h200s(n: int):
    return [DeviceMemory(f"cuda:{i}", 140 * GB, 143 * GB) for i in range(n)]


def test_weights_count_every_expert_and_the_kv_cache_is_attention_s():
    assert 61.0 * GB < weight_bytes(A3B, "bfloat16")["total"] < 61.1 * GB  # 30.5B parameters
    assert 470.1 * GB < weight_bytes(A22B, "bfloat16")["total"] < 470.3 * GB  # 235.1B parameters
    assert kv_bytes_per_token(A3B, "bfloat16") == 2 * 48 * 4 * 128 * 2
    assert mlp_width(A3B) == 768, "every layer sparse: one expert's width, not the unused intermediate_size"


def test_nvfp4_keeps_the_routers_in_the_base_dtype():
    nvfp4 = weight_bytes(A3B, "nvfp4")
    routers = 48 * 128 * 2048 * 2
    experts = 48 * 128 * 3 * (768 * 2048 // 2 + 768 * 2048 // 16 + 4)
    assert nvfp4["mlp_proj"] == routers + experts


def test_235b_a22b_does_not_fit_one_h200_and_splits_across_eight():
    with pytest.raises(QwenlabError, match=r"does not fit: qwenlab needs 470\.\d GB .* 140\.0 GB free on cuda:0"):
        plan(A22B, "bfloat16", 64, "cuda:0", devices=h200s(1))
    p = plan(A22B, "bfloat16", 64, "cuda:0", devices=h200s(8))
    assert p.placement == "split" and len(p.layer_devices) == 94 and len(set(p.layer_devices)) == 8


def test_30b_a3b_runs_one_model_at_a_time_on_one_h200():
    p = plan(A3B, "bfloat16", 64, "cuda:0", devices=h200s(1))
    assert p.placement == "sequential" and p.truth, p.describe()


def test_predicted_weights_of_the_tiny_moe_are_what_loads(moe_dir):
    model = load_model(moe_dir, "float32", "cpu")
    assert measured_weight_bytes(model) == weight_bytes(model.config, "float32")["total"]
    assert mlp_width(model.config) == 128, "layer 0 is dense: its MLP is the widest"
