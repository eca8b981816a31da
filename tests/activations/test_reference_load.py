"""Where transformers' reference is loaded: a GPU reference goes straight to its device. Staged in host memory first,
a 30B model's float32 reference (122 GB) killed notebook 04 on a 128 GB host (H200 run, 2026-12-01)."""
import transformers
from transformers import modeling_utils

from qwenlab.activations.reference import load_reference


def _calls(monkeypatch, tiny_dir, **kw):
    seen = []
    real = transformers.Qwen3ForCausalLM.from_pretrained.__func__

    def record(cls, path, **kwargs):
        seen.append(dict(kwargs, warmup=modeling_utils.caching_allocator_warmup))  # as it is during the load
        kwargs.pop("device_map", None)  # no GPU here: load on the CPU, as the recorded call asked for the GPU
        return real(cls, path, **kwargs)

    monkeypatch.setattr(transformers.Qwen3ForCausalLM, "from_pretrained", classmethod(record))
    model = load_reference(tiny_dir, **kw)
    return seen[0], model


def test_a_gpu_reference_loads_straight_onto_its_device(monkeypatch, tiny_dir):
    kwargs, _ = _calls(monkeypatch, tiny_dir, device="cuda:1")
    assert kwargs["device_map"] == "cuda:1"


def test_a_cpu_reference_and_a_staged_one_pass_no_device_map(monkeypatch, tiny_dir):
    kwargs, model = _calls(monkeypatch, tiny_dir, device="cpu")
    assert "device_map" not in kwargs and model.device.type == "cpu"
    kwargs, _ = _calls(monkeypatch, tiny_dir, device="cpu", direct_to_device=False)
    assert "device_map" not in kwargs


def test_the_allocator_warm_up_is_skipped_unless_asked(monkeypatch, tiny_dir):
    """transformers reserves a GPU model's bytes as one block before loading it; a small tensor allocated later in
    its slack keeps the whole block reserved after the model is freed. Off by default, restored after the load."""
    original = modeling_utils.caching_allocator_warmup
    skipped, _ = _calls(monkeypatch, tiny_dir, device="cuda:0")
    kept, _ = _calls(monkeypatch, tiny_dir, device="cuda:0", allocator_warmup=True)
    assert skipped["warmup"] is not original and skipped["warmup"]() is None and kept["warmup"] is original
    assert modeling_utils.caching_allocator_warmup is original
