"""The placement planner's decisions from config.json and (fake) device sizes, before anything is loaded."""
import pytest

from qwenlab.errors import QwenlabError
from qwenlab.memory.plan import DeviceMemory, model_bytes, plan, split_layers
from qwenlab.memory.predict import weight_bytes
from qwenlab.model.config import config_from_dict
from qwenlab.model.tiny import config_json

GB = 10 ** 9
Q32 = config_from_dict(config_json("qwen3-32b"))
Q4 = config_from_dict(config_json("qwen3-4b"))


def gpus(*free_gb, total_gb=80):
    return [DeviceMemory(f"cuda:{i}", int(f * GB), total_gb * GB) for i, f in enumerate(free_gb)]


def test_32b_needs_about_65_gb_a_model():
    q, r = model_bytes(Q32, "bfloat16", 32)  # the float32 reference: twice the weights
    assert 65 * GB < weight_bytes(Q32, "bfloat16")["total"] < 66 * GB
    assert 65 * GB < q < 67 * GB and 65 * GB < r < 67 * GB


def test_4b_fits_both_models_on_one_h100():
    p = plan(Q4, "bfloat16", 64, "cuda:0", devices=gpus(79))
    assert p.placement == "resident" and not p.layer_devices


def test_32b_on_one_h100_runs_sequentially_with_default_floors():
    p = plan(Q32, "bfloat16", 64, "cuda:0", devices=gpus(79))
    assert p.placement == "sequential" and not p.truth and 130 * GB < p.truth_bytes < 133 * GB
    assert "one model at a time" in p.describe() and "floors fall back to the dtype's defaults" in p.describe()


def test_32b_on_one_h200_measures_its_floors_one_model_at_a_time():
    p = plan(Q32, "bfloat16", 64, "cuda:0", devices=gpus(148, total_gb=150))
    assert p.placement == "sequential" and p.truth


def test_32b_on_two_h100s_splits_the_float32_reference_and_splits_qwenlab_when_asked():
    auto = plan(Q32, "bfloat16", 64, "cuda:0", devices=gpus(79, 79))
    assert auto.placement == "split" and auto.truth and not auto.layer_devices  # qwenlab fits one GPU
    assert "float32 reference (13" in auto.describe()
    p = plan(Q32, "bfloat16", 64, "cuda:0", placement="split", devices=gpus(79, 79))
    assert p.placement == "split"
    assert len(p.layer_devices) == 64 and p.layer_devices[0] == "cuda:0" and p.layer_devices[-1] == "cuda:1"
    assert abs(p.layer_devices.count("cuda:0") - 32) <= 2
    assert set(p.reference_max_memory) == {0, 1} and sum(p.reference_max_memory.values()) > 131 * GB
    assert "qwenlab layers: cuda:0 0-" in p.describe()


def test_32b_on_two_small_gpus_splits_under_auto():
    p = plan(Q32, "bfloat16", 64, "cuda:0", devices=gpus(60, 60, 60))
    assert p.placement == "split" and set(p.layer_devices) == {"cuda:0", "cuda:1", "cuda:2"}


def test_impossible_requests_fail_before_loading_with_the_numbers():
    with pytest.raises(QwenlabError, match=r"qwenlab needs 6\d\.\d GB .* 40\.0 GB free on cuda:0"):
        plan(Q32, "bfloat16", 64, "cuda:0", devices=gpus(40))
    with pytest.raises(QwenlabError, match="placement resident"):
        plan(Q32, "bfloat16", 64, "cuda:0", placement="resident", devices=gpus(79, 79))
    with pytest.raises(QwenlabError, match="placement 'everywhere'"):
        plan(Q32, "bfloat16", 64, "cuda:0", placement="everywhere", devices=gpus(79))


def test_cpu_plans_against_host_ram():
    host = [DeviceMemory("cpu", 12 * GB, 24 * GB)]
    assert plan(Q4, "bfloat16", 64, "cpu", devices=host).placement == "sequential"
    roomy = plan(Q4, "bfloat16", 64, "cpu", devices=[DeviceMemory("cpu", 20 * GB, 24 * GB)])
    assert roomy.placement == "sequential" and roomy.truth  # one at a time, so the float32 reference fits too
    assert plan(Q4, "bfloat16", 64, "cpu", devices=[DeviceMemory("cpu", 30 * GB, 32 * GB)]).placement == "resident"
    with pytest.raises(QwenlabError, match="free on cpu"):
        plan(Q32, "bfloat16", 64, "cpu", devices=host)


def test_split_layers_respects_room_and_order():
    layers = split_layers(Q32, "bfloat16", gpus(79, 20))
    assert layers == sorted(layers) and layers.count("cuda:1") < layers.count("cuda:0")
