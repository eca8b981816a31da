"""Memory tracker (CPU, and CUDA paths against a faked allocator) and the memory model's formulas."""
import math
import weakref

import pytest
import torch

from qwenlab.generation.chat import ChatSession
from qwenlab.generation.decode import new_cache
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory import device as memory_device
from qwenlab.memory import frame as memory_frame
from qwenlab.memory import plots as memory_plots
from qwenlab.memory import tracker as memory
from qwenlab.memory.predict import (
    bytes_per_element,
    compare,
    kv_bytes_per_token,
    kv_cache_bytes,
    measure_kv,
    measured_param_count,
    measured_weight_bytes,
    param_counts,
    predict,
    weight_bytes,
    weights_check,
    workspace_bytes,
)
from qwenlab.model.config import config_from_dict
from qwenlab.model.loader import load
from qwenlab.model.qwen3 import Qwen3
from qwenlab.model.tiny import config_json, ensure_tiny

QWEN3_4B = config_from_dict(config_json("qwen3-4b"))


@pytest.fixture(scope="module")
def tracked():
    tracker = memory.MemoryTracker("cpu")
    with tracker.phase("load"):
        ckpt = load(ensure_tiny(), "float32", "cpu")
    session = ChatSession(ckpt.model, ckpt.tokenizer)
    for turn, text in enumerate(["Hello there!", "And a second turn?"]):
        tracker.track_send(session, text, SamplingParams(max_new_tokens=4), turn=turn)
    return ckpt, tracker


# tracker
def test_cpu_tracker_frame_has_phases_and_host_bytes(tracked):
    _, tracker = tracked
    frame = tracker.frame()
    assert list(frame.columns[:5]) == ["t", "phase", "event", "turn", "step"]
    assert {"load", "prefill", "decode", "turn_end"} <= set(frame["phase"])
    assert (frame["rss"] > 0).all()
    assert frame["t"].is_monotonic_increasing
    for col in memory.CUDA_COLUMNS:
        assert frame[col].isna().all(), col
    # one USS reading per phase boundary at least; decode steps skip it (uss='boundaries')
    assert (frame[frame["event"] == "end"]["uss"] > 0).all()
    steps = frame[(frame["phase"] == "decode") & (frame["event"] == "step")]
    assert len(steps) >= 1 and steps["step"].min() == 1
    assert list(frame[frame["phase"] == "turn_end"]["turn"]) == [0, 1]


def test_turn_peaks_and_spans(tracked):
    _, tracker = tracked
    peaks = tracker.turn_peaks()
    assert list(peaks["turn"]) == [0, 1]
    assert (peaks["peak_rss"] >= peaks["end_rss"] * 0.5).all() and (peaks["peak_rss"] > 0).all()
    spans = tracker.spans_frame()
    assert {"load", "prefill", "decode"} <= set(spans["phase"])
    assert (spans["t1"] >= spans["t0"]).all()


def test_plots_and_fragmentation_on_cpu(tracked):
    _, tracker = tracked
    frame = tracker.frame()
    fig = memory_plots.plot_timeline(frame, tracker.spans_frame())
    assert "CPU" in fig.axes[0].get_title()
    assert memory_frame.fragmentation(frame).empty
    assert memory_plots.plot_fragmentation(frame) is None
    assert math.isfinite(memory_frame.phase_delta(frame, "load", "rss"))


def test_background_thread_samples_ticks():
    tracker = memory.MemoryTracker("cpu", interval_s=0.01)
    with tracker.phase("work"):
        x = torch.ones(1_000_000)
        import time
        time.sleep(0.1)
        del x
    tracker.stop()
    frame = tracker.frame()
    ticks = frame[frame["event"] == "tick"]
    assert len(ticks) >= 3 and (ticks["rss"] > 0).all() and ticks["uss"].isna().all()


def test_labels_become_columns():
    tracker = memory.MemoryTracker("cpu", uss="off")
    with tracker.labelled(strategy="session"):
        tracker.mark("turn_end", turn=0)
    tracker.mark("other")
    frame = tracker.frame()
    assert list(frame["strategy"].fillna("-")) == ["session", "-"]
    assert frame["uss"].isna().all()


def test_policies_on_cpu(capsys):
    assert memory_device.empty_cache("cpu") is False
    assert memory_device.apply_allocator_config(None) == "default"
    if not torch.cuda.is_available():
        assert memory_device.apply_allocator_config(True) == "n/a (no CUDA)"
        with memory_device.record_history("/tmp/never.pickle") as path:
            pass
        assert path is None and "CUDA is not available" in capsys.readouterr().out
    assert memory_device.allocator_config(True).endswith("expandable_segments:True")


def test_live_tensor_bytes_counts_real_storage_and_skips_fake_tensors():
    """A process that used torch.compile keeps fake tensors reachable (Dynamo's caches); the CPU leak baseline walks
    them too and must neither fail on their missing data pointer nor count them (it did fail, in CI, after a test
    that compiled a function)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    before = memory_device.live_tensor_bytes("cpu")
    with FakeTensorMode():
        fake = torch.empty(1 << 20)
    gone = torch.ones(4)
    dead = [weakref.proxy(gone)]  # a weak proxy whose tensor is gone: any attribute access raises ReferenceError
    del gone
    real = torch.ones(1 << 18)  # 1 MiB
    assert memory_device.live_tensor_bytes("cpu") - before == real.nbytes
    del fake, real, dead


class FakeCuda:
    """Stands in for torch.cuda's allocator API so the CUDA branches run on a CPU machine."""

    def __init__(self):
        self.allocated, self.reserved, self.peak = 1000, 4096, 1000
        self.resets = 0

    def memory_stats(self, device=None):
        return {"allocated_bytes.all.current": self.allocated, "reserved_bytes.all.current": self.reserved,
                "active_bytes.all.current": self.allocated + 10, "inactive_split_bytes.all.current": 7,
                "allocated_bytes.all.peak": self.peak, "reserved_bytes.all.peak": self.reserved,
                "num_alloc_retries": 2, "num_ooms": 0}

    def mem_get_info(self, device=None):
        return (80_000 - 6000, 80_000)

    def reset_peak_memory_stats(self, device=None):
        self.resets += 1
        self.peak = self.allocated


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", fake.memory_stats)
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake.mem_get_info)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: setattr(fake, "reserved", fake.allocated))
    return fake


def test_cuda_columns_from_the_allocator(fake_cuda):
    tracker = memory.MemoryTracker("cuda", uss="off")
    assert tracker.cuda
    tracker.begin("prefill", turn=0)
    fake_cuda.allocated, fake_cuda.peak = 3000, 3500
    tracker.end()
    tracker.mark("turn_end", turn=0)
    frame = tracker.frame()
    end = frame[frame["event"] == "end"].iloc[0]
    assert end["cuda_allocated"] == 3000 and end["cuda_reserved"] == 4096 and end["cuda_active"] == 3010
    assert end["cuda_inactive_split"] == 7 and end["cuda_num_alloc_retries"] == 2
    assert end["cuda_peak_allocated"] == 3500
    assert end["cuda_device_used"] == 6000 and end["cuda_device_total"] == 80_000
    assert fake_cuda.resets == 1
    peaks = memory_frame.turn_peaks(frame)
    assert peaks.loc[0, "peak_cuda_allocated"] == 3500 and peaks.loc[0, "end_cuda_reserved"] == 4096
    frag = memory_frame.fragmentation(frame)
    assert (frag["cached_unused"] == frame["cuda_reserved"] - frame["cuda_allocated"]).all()
    assert memory_device.empty_cache("cuda") is True and fake_cuda.reserved == fake_cuda.allocated


# memory model
def test_qwen3_4b_parameter_count_by_hand():
    c = param_counts(QWEN3_4B)
    per_layer = (4096 * 2560 + 2 * 1024 * 2560 + 2560 * 4096) + 3 * 9728 * 2560 + 2 * 2560 + 2 * 128
    assert per_layer == 100_930_816
    assert c["embed_tokens"] == 151936 * 2560 == 388_956_160
    assert c["lm_head"] == 0  # tied
    assert c["total"] == 388_956_160 + 36 * per_layer + 2560 == 4_022_468_096


def test_qwen3_4b_bytes_by_hand():
    assert kv_bytes_per_token(QWEN3_4B, "bfloat16") == 36 * 8 * 128 * 2 * 2 == 147_456
    assert kv_bytes_per_token(QWEN3_4B, torch.float32) == 294_912
    assert kv_cache_bytes(QWEN3_4B, "bfloat16", 8192) == 147_456 * 8192
    assert weight_bytes(QWEN3_4B, "bfloat16")["total"] == 2 * 4_022_468_096 == 8_044_936_192
    assert weight_bytes(QWEN3_4B, torch.float32)["total"] == 4 * 4_022_468_096
    # NVFP4 projections: 0.5 byte per element + one fp8 scale per 16 + one fp32 scale per tensor;
    # embeddings and norms stay bfloat16.
    linear = 36 * (4096 * 2560 + 2 * 1024 * 2560 + 2560 * 4096 + 3 * 9728 * 2560)
    nvfp4 = linear // 2 + linear // 16 + 4 * 7 * 36 + 2 * 388_956_160 + 2 * (36 * 5376 + 2560)
    assert weight_bytes(QWEN3_4B, "nvfp4")["total"] == nvfp4 == 2_822_045_680
    assert bytes_per_element("nvfp4") == 0.5625


def test_workspace_and_prediction():
    w = workspace_bytes(QWEN3_4B, "bfloat16", 100)
    assert w["logits"] == 151936 * (2 + 4)  # one position's logits, model dtype + the sampler's float32
    assert w["activations"] == 100 * (4 * 9728 * 2 + 3 * 2560 * 4 + 4 * 4096 * 2 + 2 * 1024 * 2)
    assert w["attention_scores"] == 0
    assert workspace_bytes(QWEN3_4B, "bfloat16", 10, scores_materialised=True)["attention_scores"] == 2 * 32 * 100 * 4
    p = predict(QWEN3_4B, "bfloat16", kv_len=1000, prefill_tokens=100)
    assert p.total == 8_044_936_192 + 147_456_000 + w["total"]


def test_compare_flags_beyond_threshold():
    assert compare("x", 101, 100, 0.02)["flagged"] is False
    row = compare("x", 110, 100, 0.02)
    assert row["flagged"] is True and row["delta_bytes"] == 10 and math.isclose(row["rel_error"], 0.1)


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied"])
def test_param_counts_match_an_instantiated_model(preset):
    cfg = config_from_dict(config_json(preset))
    with torch.device("meta"):
        model = Qwen3(cfg)  # untied at construction: lm_head is its own parameter until the loader ties it
    total = sum(p.numel() for p in model.parameters())
    head = cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0
    assert total == param_counts(cfg)["total"] + head


def test_loaded_tiny_model_matches_the_formulas(tracked):
    ckpt, _ = tracked
    model = ckpt.model
    assert measured_param_count(model) == sum(p.numel() for p in model.parameters())  # a tied head counted once
    assert measured_param_count(model) == param_counts(model.config)["total"]
    assert measured_weight_bytes(model) == weight_bytes(model.config, model.dtype)["total"]
    table = weights_check(model, float("nan"), 0.01)
    assert len(table) == 2 and not table["flagged"].any()
    for preallocate in (True, False):
        cache = new_cache(model, 32, preallocate)
        assert cache.nbytes() == (kv_cache_bytes(model.config, model.dtype, 32) if preallocate else 0)


def test_measure_kv_on_cpu(tracked):
    ckpt, _ = tracked
    kv = measure_kv(ckpt.model, [8, 32])
    assert list(kv["layout"]) == ["preallocated", "grown"] * 2
    assert (kv["rel_error"] == 0).all()
    assert kv["cuda_allocated_delta"].isna().all()
