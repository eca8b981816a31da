"""A model split by layer ranges: the device map spec, and on the CPU the split path itself (layers mapped to "cpu"
twice, so every input-moving hook and the per-layer KV cache run) against the unsplit model."""
import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.generation.decode import generate, new_cache
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.loader import load
from qwenlab.model.placement import is_split, parse_device_map
from qwenlab.model.probe import Probe


def test_device_map_specs():
    assert parse_device_map("cpu:0-1,cpu:2-3", 4) == ["cpu"] * 4
    assert parse_device_map(["cpu"] * 3, 3) == ["cpu"] * 3
    for bad, message in [("cpu:0-1", "layer 2 is not mapped"), ("cpu:0-2,cpu:2-3", "layer 2 is mapped twice"),
                         ("cpu:0-9", "outside 0-3"), ("cpu:a-b", "not DEVICE:FIRST-LAST"),
                         ("0:0-3", "not visible" if not torch.cuda.is_available() else "")]:
        if message:
            with pytest.raises(QwenlabError, match=message):
                parse_device_map(bad, 4)


def test_split_on_the_cpu_gives_the_unsplit_model_s_activations_and_tokens(tiny_dir, tiny):
    split = load(tiny_dir, "float32", "cpu", device_map="cpu:0-1,cpu:2-3")
    assert split.model.layer_devices == ["cpu"] * 4 and not is_split(split.model)
    assert split.model.lm_head.weight is split.model.model.embed_tokens.weight  # still tied after the move
    hooks = [len(layer._forward_pre_hooks) for layer in split.model.model.layers]
    assert hooks == [1, 1, 1, 1]
    ids = torch.tensor(tiny.tokenizer.encode("Have you ever seen a UFO?"))
    a, b = Probe(to_cpu=True), Probe(to_cpu=True)
    tiny.model(ids, probe=a)
    split.model(ids, probe=b)
    assert list(a.tensors) == list(b.tensors)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    cache = new_cache(split.model, 64)
    assert [k.device.type for k in cache.k] == ["cpu"] * 4
    params = SamplingParams(max_new_tokens=12)
    assert generate(split.model, ids.tolist(), params, stop_ids=(-1,)).ids == \
        generate(tiny.model, ids.tolist(), params, stop_ids=(-1,)).ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CPU + CUDA split needs a GPU")
def test_split_across_cuda_and_cpu(tiny_dir, tiny):
    split = load(tiny_dir, "float32", device_map="0:0-1,cpu:2-3")
    assert is_split(split.model) and split.model.layer_devices == ["cuda:0", "cuda:0", "cpu", "cpu"]
    ids = tiny.tokenizer.encode("Have you ever seen a UFO?")
    ref = tiny.model(torch.tensor(ids))
    out = split.model(torch.tensor(ids, device="cuda:0"))
    assert out.device.type == "cuda"  # the tied head runs where its weight (the embedding) lives
    assert ((out.cpu() - ref).norm() / ref.norm()).item() < 1e-5
    params = SamplingParams(max_new_tokens=12)
    gen = generate(split.model, ids, params, stop_ids=(-1,))
    assert gen.engine == "eager" and "split" in gen.engine_note
    assert gen.ids == generate(tiny.model, ids, params, stop_ids=(-1,)).ids
