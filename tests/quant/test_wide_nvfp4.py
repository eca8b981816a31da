"""The wide-load NVFP4 GEMV (qwenlab.quant.wide_nvfp4), the default decode GEMV on CUDA: against a float64 matmul
of codec.dequantize's weight on CUDA (every x dtype, subnormal block scales, K not a multiple of its step, split-K,
1-3 weights in one launch, per-row tensor scales); on the CPU, what it compiles to for sm_90 (16-byte loads, no
shared memory, barrier or shuffle in its loop) and which GEMV QWENLAB_NVFP4_GEMV selects.
"""
import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.quant import codec
from tests.quant.nvfp4_weights import weights_with_subnormal_scales

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from qwenlab.quant import triton_nvfp4  # noqa: E402

needs_gluon_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                                     reason="needs a CUDA GPU of compute capability 8.0 or newer")


def test_the_kernel_compiles_for_hopper_to_16_byte_loads_without_shared_memory():
    """Compiled for sm_90 without a GPU (Triton bundles ptxas): each step reads the weight rows and x with 16-byte
    loads, and the loop exchanges nothing between threads (no shared memory, barrier or shuffle)."""
    pytest.importorskip("triton.backends.nvidia")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from nvfp4_gemv_sass import compile_wide, loop_instructions

    for name, config in triton_nvfp4.WIDE_CONFIGS.items():
        kernel = compile_wide(config["RN"], config["VW"], config["TN"], config["WARPS"], parts=2,
                              s_pairs=config["S_PAIRS"], arch=90)
        if kernel is None:
            pytest.skip("this Triton cannot compile Gluon for sm_90 here")
        assert kernel.metadata.shared == 0, name
        body = loop_instructions(kernel.asm["cubin"], f"/tmp/qwenlab_test_wide_{name}.cubin")
        wide_loads = [op for op in body if op.startswith("LDG") and op.endswith(".128")]
        assert len(wide_loads) == config["RN"] + config["VW"] * 8 * 2 // 16, (name, body)  # rows + x's 16-byte rows
        assert not {"BAR", "SHFL", "STS", "LDS"} & {op.split(".")[0] for op in body}, name


@needs_gluon_gpu
@pytest.mark.parametrize("ns,k,dtype,config", [
    ((4096, 1024, 1024), 2560, torch.bfloat16, {}),  # q/k/v: the small tile, even K
    ((9728, 9728), 2560, torch.bfloat16, {}),  # gate/up: the large tile
    ((2560,), 9728, torch.bfloat16, {}),  # down: split-K, K not a multiple of the split's steps
    ((2560,), 4096, torch.float32, {}),  # o in float32: split-K, even
    ((1000, 37), 2576, torch.float16, {"SPLIT": 2}),  # K not a multiple of the step, split over two parts
    ((40,), 48, torch.bfloat16, {}),  # under one step
    ((300, 200), 1024, torch.bfloat16, {"PREFETCH": True, "RN": 4, "TN": 1, "WARPS": 2}),
    ((2560,), 4096, torch.bfloat16, {"SPLIT": 4, "FINISH": True}),  # the last program of a tile sums the split
    ((1000, 37), 2576, torch.float16, {"SPLIT": 2, "FINISH": True}),
    ((9728, 9728), 2560, torch.bfloat16, {"SPLIT": 8, "FINISH": True, "PREFETCH": True}),
    ((2560,), 9728, torch.bfloat16, {"S_PAIRS": True, "SPLIT": 4, "FINISH": True}),  # scales two at a time, masked
    ((4096, 1024, 1024), 2560, torch.float32, {"S_PAIRS": True, "RN": 4, "WARPS": 2}),
    ((1000, 37), 2576, torch.bfloat16, {"S_PAIRS": True}),  # K / 16 odd: one scale at a time after all
])
def test_wide_gemv_matches_a_float64_matmul_on_cuda(ns, k, dtype, config):
    gen = torch.Generator("cuda").manual_seed(sum(ns) + k)
    parts = weights_with_subnormal_scales(ns, k, gen)
    weights = [codec.dequantize(q, torch.float32).double() for q in parts]
    if len(ns) == 1:  # one weight with a per-row tensor scale (a fused weight whose parts had their own)
        q = parts[0]
        rows = torch.rand(ns[0], device="cuda", generator=gen) + 0.5
        parts = [codec.NVFP4Weight(q.packed, q.block_scale, q.tensor_scale * rows)]
        weights = [weights[0] * rows.double()[:, None]]
    x = torch.randn(1, k, device="cuda", generator=gen).to(dtype)
    ref = torch.cat([x.double().reshape(k) @ w.T for w in weights])
    y = triton_nvfp4.gemv_with_config(x, [(q.packed, q.block_scale, q.tensor_scale) for q in parts],
                                      {"WIDE": True, **config})
    assert y.shape == (1, sum(ns)) and y.dtype == dtype and torch.isfinite(y).all()
    tolerance = 1e-6 if dtype == torch.float32 else 5e-3
    for i, n in enumerate(ns):  # every part in its own rows, the tiny-scale rows too
        start = sum(ns[:i])
        got, want = y.reshape(-1)[start:start + n].double(), ref[start:start + n]
        assert ((got - want).norm() / want.norm()).item() < tolerance
        small = slice(start, start + max(n // 8, 1))
        assert ((y.reshape(-1)[small].double() - ref[small]).norm() / ref[small].norm()).item() < tolerance


@needs_gluon_gpu
def test_the_wide_gemv_is_the_default_on_cuda_and_the_others_run_when_asked(monkeypatch):
    x = torch.randn(1, 64, device="cuda").bfloat16()
    monkeypatch.delenv("QWENLAB_NVFP4_GEMV", raising=False)
    assert triton_nvfp4.gemv_engine(x) == triton_nvfp4.gemv_engine(x.float()) == "wide"
    assert triton_nvfp4.gemv_engine(x, bias=torch.zeros(8, device="cuda")) == "fma"  # no bias in the Gluon ones
    monkeypatch.setenv("QWENLAB_NVFP4_GEMV", "fma")
    assert triton_nvfp4.gemv_engine(x) == "fma"


def test_a_cpu_row_takes_the_fma_gemv_and_an_unknown_choice_is_refused(monkeypatch):
    monkeypatch.delenv("QWENLAB_NVFP4_GEMV", raising=False)
    assert triton_nvfp4.gemv_engine(torch.zeros(1, 64, dtype=torch.bfloat16)) == "fma"
    monkeypatch.setenv("QWENLAB_NVFP4_GEMV", "fast")
    with pytest.raises(QwenlabError, match="QWENLAB_NVFP4_GEMV='fast': choose one of wide, fma, mma"):
        triton_nvfp4.gemv_engine(torch.zeros(1, 64, dtype=torch.bfloat16))


def test_the_wide_gemv_refuses_what_it_cannot_multiply():
    q = codec.quantize(torch.randn(16, 64))
    with pytest.raises(QwenlabError, match="gemv_with_config: the wide GEMV takes a row on CUDA and no bias"):
        triton_nvfp4.gemv_with_config(torch.randn(1, 64), [(q.packed, q.block_scale, q.tensor_scale)],
                                      {"WIDE": True})


@needs_gluon_gpu
def test_a_split_that_sums_itself_gives_the_same_rows_call_after_call_and_in_a_cuda_graph():
    """FINISH: each row tile's programs count themselves on a per-device counter and the last sums the partial
    rows in split order, then sets the counter back to zero; so every call, eager or replayed from a graph, gives
    the same rows bit for bit, the two-kernel split's within bf16 rounding (it sums the same partials as a tree)."""
    gen = torch.Generator("cuda").manual_seed(7)
    q = codec.quantize(torch.randn(2560, 9728, device="cuda", generator=gen) * 0.02)
    weights = [(q.packed, q.block_scale, q.tensor_scale)]
    x = torch.randn(1, 9728, device="cuda", generator=gen).bfloat16()
    finish = {"WIDE": True, "SPLIT": 4, "FINISH": True}
    first = triton_nvfp4.gemv_with_config(x, weights, finish)
    two_kernels = {"WIDE": True, "SPLIT": 4, "FINISH": False}
    torch.testing.assert_close(first, triton_nvfp4.gemv_with_config(x, weights, two_kernels))
    for _ in range(3):
        assert torch.equal(triton_nvfp4.gemv_with_config(x, weights, finish), first)
    out = torch.empty_like(first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(triton_nvfp4.gemv_with_config(x, weights, finish))
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
    assert int(triton_nvfp4._split_counters(x.device).abs().sum()) == 0
