"""A model split by layer ranges: the device map spec, the device of each tensor, and on the CPU the split path
(layers mapped to "cpu" twice: per-layer KV cache devices, tied head) against the unsplit model."""
import pytest
import torch

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.errors import QwenlabError
from qwenlab.generation.decode import generate, new_cache
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.loader import load
from qwenlab.model.placement import device_of, parse_device_map


def test_device_map_specs():
    assert parse_device_map("cpu:0-1,cpu:2-3", 4) == ["cpu"] * 4
    assert parse_device_map(["cpu"] * 3, 3) == ["cpu"] * 3
    for bad, message in [("cpu:0-1", "layer 2 is not mapped"), ("cpu:0-2,cpu:2-3", "layer 2 is mapped twice"),
                         ("cpu:0-9", "outside 0-3"), ("cpu:a-b", "not DEVICE:FIRST-LAST"),
                         ("0:0-3", "not visible" if not torch.cuda.is_available() else "")]:
        if message:
            with pytest.raises(QwenlabError, match=message):
                parse_device_map(bad, 4)


def test_each_tensor_goes_to_the_device_of_its_layer():
    layers = ["cuda:0", "cuda:0", "cuda:1"]
    assert device_of("model.embed_tokens.weight", layers, tied=True) == torch.device("cuda:0")
    assert device_of("model.layers.2.mlp.down_proj.weight", layers, tied=True) == torch.device("cuda:1")
    assert device_of("model.norm.weight", layers, tied=True) == torch.device("cuda:1")
    assert device_of("lm_head.weight", layers, tied=False) == torch.device("cuda:1")
    assert device_of("lm_head.weight", layers, tied=True) == torch.device("cuda:0")


def test_split_on_the_cpu_gives_the_unsplit_model_s_activations_and_tokens(tiny_dir, tiny):
    split = load(tiny_dir, "float32", "cpu", device_map="cpu:0-1,cpu:2-3")
    assert split.model.layer_devices == ["cpu"] * 4 and not split.model.is_split
    assert split.model.lm_head.weight is split.model.model.embed_tokens.weight  # tied
    ids = tiny.tokenizer.encode("Have you ever seen a UFO?")
    a, b = capture_qwenlab(tiny.model, ids), capture_qwenlab(split.model, ids)
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    cache = new_cache(split.model, 64)
    assert [k.device.type for k in cache.k] == ["cpu"] * 4
    params = SamplingParams(max_new_tokens=12)
    assert generate(split.model, ids, params, stop_ids=(-1,)).ids == generate(tiny.model, ids, params, stop_ids=(-1,)).ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CPU + CUDA split needs a GPU")
@torch.inference_mode()
def test_split_across_cuda_and_cpu(tiny_dir, tiny):
    split = load(tiny_dir, "float32", device_map="0:0-1,cpu:2-3")
    assert split.model.is_split and split.model.layer_devices == ["cuda:0", "cuda:0", "cpu", "cpu"]
    assert split.model.model.layers[3].mlp.down_proj.weight.device.type == "cpu"
    ids = tiny.tokenizer.encode("Have you ever seen a UFO?")
    ref = tiny.model(torch.tensor(ids))
    out = split.model(torch.tensor(ids, device="cuda:0"))
    assert out.device.type == "cuda"  # the tied head runs where its weight (the embedding) lives
    assert ((out.cpu() - ref).norm() / ref.norm()).item() < 1e-5
    params = SamplingParams(max_new_tokens=12)
    gen = generate(split.model, ids, params, stop_ids=(-1,))
    assert gen.engine == "eager" and "split" in gen.engine_note
    assert gen.ids == generate(tiny.model, ids, params, stop_ids=(-1,)).ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a split across two GPUs needs two")
@torch.inference_mode()
def test_an_nvfp4_model_split_across_two_gpus_runs_each_layer_on_its_gpu(tiny_dir, tiny):
    """Layers 0-1 on the first GPU and 2-3 on the second, the first current: every Triton kernel of a layer (the
    prefill's dequantize, the one-token step's NVFP4 GEMVs and attention) launches on the layer's GPU, so the
    split model's logits and greedy tokens are those of the model on one GPU."""
    torch.cuda.set_device(0)
    whole = load(tiny_dir, "bfloat16", "cuda:0", "nvfp4")
    split = load(tiny_dir, "bfloat16", device_map="0:0-1,1:2-3", quant="nvfp4")
    assert split.model.is_split and split.model.layer_devices == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    ids = tiny.tokenizer.encode("Have you ever seen a UFO?")
    ref = whole.model(torch.tensor(ids, device="cuda:0")).float().cpu()
    out = split.model(torch.tensor(ids, device="cuda:0")).float().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    params = SamplingParams(max_new_tokens=12)
    gen = generate(split.model, ids, params, stop_ids=(-1,))
    want = generate(whole.model, ids, params, stop_ids=(-1,), engine="eager")
    assert gen.engine == "eager" and gen.ids == want.ids
    assert torch.cuda.current_device() == 0
