"""The NVFP4 Triton kernels (qwenlab.quant.triton_nvfp4) against a float64 matmul of codec.dequantize's weight.

CUDA tests run where a GPU is; the `interpreted` ones run small shapes on the CPU only under Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/quant/test_triton_nvfp4.py

A per-row tensor scale is built as the loader would meet it: a fused weight whose row segments were quantized
separately (each with its own tensor scale); the reference dequantizes each segment on its own.
"""
import os
import re

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.quant import codec

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_cuda = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA (and no interpreter)")
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 (Triton's CPU interpreter)")

from qwenlab.quant.triton_nvfp4 import (  # noqa: E402
    dequantize_groups,
    dequantize_into,
    dequantize_parts_into,
    gemv_split,
    layer_gemv,
    nvfp4_gemm,
    nvfp4_gemv,
    nvfp4_gemv_parts,  # noqa: E402
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}  # fp32 accumulation, then the cast


def fused_weight(n: int, k: int, per_row: bool, device, gen):
    """-> (packed, block_scale, tensor_scale, parts). per_row: three row segments quantized apart (different amax,
    so different tensor scales), tensor_scale a float32 vector [n]; else one weight and a scalar tensor scale."""
    sizes = [n - 2 * (n // 3), n // 3, n // 3] if per_row else [n]
    parts = [codec.quantize(torch.randn(size, k, device=device, generator=gen) * (0.02 * (i + 1)))
             for i, size in enumerate(sizes)]
    packed, block_scale = torch.cat([q.packed for q in parts]), torch.cat([q.block_scale for q in parts])
    if not per_row:
        return packed, block_scale, parts[0].tensor_scale, parts
    return packed, block_scale, torch.cat([q.tensor_scale.expand(size) for q, size in zip(parts, sizes)]), parts


def reference(parts, dtype=torch.float64) -> torch.Tensor:
    """The weight [n, k]: codec.dequantize of each part (in float32, then cast), stacked."""
    return torch.cat([codec.dequantize(q, torch.float32 if dtype == torch.float64 else dtype) for q in parts]).to(dtype)


def poison_next(shape, dtype, device):
    """Fills a freed block of the output's size with NaN, so that the kernel's torch.empty output (reused from the
    caching allocator) shows any element the kernel did not write."""
    if torch.device(device).type == "cuda":
        torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_l2(y, ref) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def check_gemv(n, k, dtype, per_row, bias, device, seed, offset=0):
    """offset: x starts that many elements into its buffer (1 with bf16: not 4-byte aligned, the per-element path)."""
    gen = torch.Generator(device).manual_seed(seed)
    packed, block_scale, tensor_scale, parts = fused_weight(n, k, per_row, device, gen)
    weight = reference(parts)
    x = torch.randn(1, 1, k + offset, device=device, generator=gen).to(dtype)[..., offset:]
    b = torch.randn(n, device=device, generator=gen).to(dtype) if bias else None
    ref = x.double().reshape(k) @ weight.T + (b.double() if bias else 0)
    poison_next((n,), dtype, device)
    y = nvfp4_gemv(x, packed, block_scale, tensor_scale, b)
    assert y.shape == (1, 1, n) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_l2(y.reshape(n), ref) < TOLERANCE[dtype]


def check_gemv_parts(ns, k, dtype, device, seed):
    """Weights of the same K (each quantized on its own, its own tensor scale) in one launch: x times each,
    concatenated, against float64 matmuls of codec.dequantize's weights."""
    gen = torch.Generator(device).manual_seed(seed)
    parts = [codec.quantize(torch.randn(n, k, device=device, generator=gen) * (0.02 * (i + 1)))
             for i, n in enumerate(ns)]
    x = torch.randn(1, 1, k, device=device, generator=gen).to(dtype)
    ref = torch.cat([x.double().reshape(k) @ reference([q]).T for q in parts])
    poison_next((sum(ns),), dtype, device)
    y = nvfp4_gemv_parts(x, [q.packed for q in parts], [q.block_scale for q in parts],
                         [q.tensor_scale for q in parts])
    assert y.shape == (1, 1, sum(ns)) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_l2(y.reshape(-1), ref) < TOLERANCE[dtype]
    for i, q in enumerate(parts):  # each part lands in its own rows, not just the sum
        start = sum(ns[:i])
        assert rel_l2(y.reshape(-1)[start:start + ns[i]], ref[start:start + ns[i]]) < TOLERANCE[dtype]


def check_gemm(m, n, k, dtype, per_row, bias, device, seed):
    gen = torch.Generator(device).manual_seed(seed)
    packed, block_scale, tensor_scale, parts = fused_weight(n, k, per_row, device, gen)
    weight = reference(parts)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    b = torch.randn(n, device=device, generator=gen).to(dtype) if bias else None
    ref = x.double() @ weight.T + (b.double() if bias else 0)
    poison_next((m, n), dtype, device)
    y = nvfp4_gemm(x, packed, block_scale, tensor_scale, b)
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_l2(y, ref) < TOLERANCE[dtype]


def check_dequantize_into(n, k, dtype, per_row, device, seed):
    gen = torch.Generator(device).manual_seed(seed)
    packed, block_scale, tensor_scale, parts = fused_weight(n, k, per_row, device, gen)
    out = torch.full((n, k), float("nan"), dtype=dtype, device=device)
    assert dequantize_into(out, packed, block_scale, tensor_scale) is out
    assert torch.equal(out, reference(parts, dtype))
    # the same rows as separate weights (3 parts when per_row, else the one), each with its own tensor scale, into
    # one buffer in one launch, then 2 of them
    weights = [(q.packed, q.block_scale, q.tensor_scale) for q in parts]
    for some in (weights, weights[:2]):
        rows = sum(p.shape[0] for p, _, _ in some)
        out = torch.full((rows, k), float("nan"), dtype=dtype, device=device)
        assert dequantize_parts_into(out, some) is out
        assert torch.equal(out, reference(parts[:len(some)], dtype))


# (N, K): N not a multiple of the row block (1000), K a multiple of 16 but not of BLOCK_K (2576 = 161 blocks of 16),
# small N, the Qwen3-4B down projection and lm_head; split-K (gemv_split > 1) for N < 4096 and the down projection.
GEMV_CASES = [(1024, 2560, torch.bfloat16, False, False, 0), (1000, 2576, torch.bfloat16, True, True, 0),
              (1000, 2576, torch.bfloat16, False, False, 1), (1000, 2576, torch.float32, False, True, 0),
              (2560, 9728, torch.float32, True, False, 0), (6144, 2560, torch.bfloat16, True, False, 0),
              (151936, 2560, torch.bfloat16, False, False, 0), (40, 48, torch.float16, True, True, 0)]


@needs_cuda
@pytest.mark.parametrize("n,k,dtype,per_row,bias,offset", GEMV_CASES)
def test_gemv_matches_a_float64_matmul_on_cuda(n, k, dtype, per_row, bias, offset):
    check_gemv(n, k, dtype, per_row, bias, "cuda", seed=n + k, offset=offset)


@needs_cuda
@pytest.mark.parametrize("ns,k,dtype", [((4096, 1024, 1024), 2560, torch.bfloat16),
                                        ((9728, 9728), 2560, torch.bfloat16), ((1000, 24, 40), 2576, torch.float32),
                                        ((40,), 48, torch.float16)])
def test_gemv_parts_match_float64_matmuls_on_cuda(ns, k, dtype):
    check_gemv_parts(ns, k, dtype, "cuda", seed=sum(ns) + k)


@needs_cuda
@pytest.mark.parametrize("m,n,k,dtype,per_row,bias", [
    (2, 1024, 2560, torch.bfloat16, False, False), (17, 1000, 2576, torch.bfloat16, True, True),
    (300, 6144, 2560, torch.float16, True, False), (2048, 2560, 9728, torch.bfloat16, False, False),
    (2048, 1000, 2576, torch.bfloat16, False, True)])
def test_gemm_matches_a_float64_matmul_on_cuda(m, n, k, dtype, per_row, bias):
    check_gemm(m, n, k, dtype, per_row, bias, "cuda", seed=m + n + k)


@needs_cuda
@pytest.mark.parametrize("n,k,dtype,per_row", [(1000, 2576, torch.bfloat16, True), (2560, 9728, torch.float16, False),
                                               (40, 48, torch.float32, True), (1024, 2560, torch.float32, False)])
def test_dequantize_into_is_bit_identical_to_codec_on_cuda(n, k, dtype, per_row):
    check_dequantize_into(n, k, dtype, per_row, "cuda", seed=n + k)


@needs_cuda
def test_gemv_runs_under_torch_compile_and_in_a_cuda_graph():
    gen = torch.Generator("cuda").manual_seed(1)
    packed, block_scale, tensor_scale, parts = fused_weight(3072, 2560, True, "cuda", gen)
    weight = reference(parts)
    x = torch.randn(1, 2560, device="cuda", generator=gen).bfloat16()
    eager = nvfp4_gemv(x, packed, block_scale, tensor_scale)  # also autotunes, outside any capture

    compiled = torch.compile(lambda x: nvfp4_gemv(x * 2, packed, block_scale, tensor_scale) + 1, fullgraph=True)
    torch.testing.assert_close(compiled(x), (nvfp4_gemv(x * 2, packed, block_scale, tensor_scale) + 1))

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = nvfp4_gemv(static_x, packed, block_scale, tensor_scale)
    fresh = torch.randn(1, 2560, device="cuda", generator=gen).bfloat16()
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(static_y, eager)
    assert torch.equal(static_y, nvfp4_gemv(fresh, packed, block_scale, tensor_scale))
    assert rel_l2(static_y.reshape(-1), fresh.double().reshape(-1) @ weight.T) < TOLERANCE[torch.bfloat16]


@needs_cuda
def test_gemm_takes_leading_dims_and_runs_in_a_cuda_graph():
    gen = torch.Generator("cuda").manual_seed(2)
    packed, block_scale, tensor_scale, parts = fused_weight(1024, 2560, False, "cuda", gen)
    weight = reference(parts)
    x = torch.randn(2, 64, 2560, device="cuda", generator=gen).bfloat16()
    nvfp4_gemm(x, packed, block_scale, tensor_scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nvfp4_gemm(x, packed, block_scale, tensor_scale)
    graph.replay()
    torch.cuda.synchronize()
    assert y.shape == (2, 64, 1024)
    assert rel_l2(y, x.double() @ weight.T) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("call,message", [
    (lambda q, x: nvfp4_gemv(x[:, :32], q.packed, q.block_scale, q.tensor_scale), "K = 48"),
    (lambda q, x: nvfp4_gemv(torch.cat([x, x]), q.packed, q.block_scale, q.tensor_scale), "more than one row"),
    (lambda q, x: nvfp4_gemm(x.float(), q.packed, q.block_scale, q.tensor_scale), "bfloat16 or float16"),
    (lambda q, x: nvfp4_gemv(x, q.packed, q.block_scale, q.tensor_scale.expand(3)), "tensor_scale"),
    (lambda q, x: nvfp4_gemv(x, q.packed, q.block_scale[:, :2], q.tensor_scale), "block_scale"),
    (lambda q, x: dequantize_into(torch.empty(8, 48), q.packed, q.block_scale, q.tensor_scale), "out [8, 48]"),
    (lambda q, x: dequantize_into(torch.empty(16, 48).as_strided((16, 48), (8, 1)), q.packed, q.block_scale,
                                  q.tensor_scale), "out's rows overlap (row stride 8 under K = 48)"),
    (lambda q, x: dequantize_groups([[(q.packed, q.block_scale, q.tensor_scale),
                                      (q.packed[:, :16], q.block_scale[:, :2], q.tensor_scale)]], torch.float32),
     "the weights of a group must share K, got K [48, 32]")])
def test_bad_input_is_a_one_line_error(call, message):
    q = codec.quantize(torch.randn(16, 48))
    with pytest.raises(QwenlabError, match=re.escape(message)):
        call(q, torch.randn(1, 48).bfloat16())


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": "one", "glu": True}, "glu takes two weights of the same rows (gate, up), got rows [16]"),
    ({"weights": "uneven", "glu": True}, "got rows [16, 32]"),
    ({"weights": "two", "residual": 16}, "a residual adds to one weight's rows ([16, 16]), got 2 weights"),
    ({"weights": "one", "residual": 8}, "and a residual of 8"),
    ({"weights": "one", "norm": True, "config": {"SPLIT": 2}}, "a split along K (2) sums in the kernel")])
def test_the_layer_gemv_refuses_what_its_epilogues_cannot_do(kwargs, message):
    """triton_nvfp4.layer_gemv (the fused NVFP4 layer's GEMV) says in one line, before any launch, what it cannot
    do: SiLU x up of anything but two weights of the same rows, a residual beside more than one weight or of another
    length, a norm over a split of K."""
    q, wide = codec.quantize(torch.randn(16, 48)), codec.quantize(torch.randn(32, 48))
    one, two = [(q.packed, q.block_scale, q.tensor_scale)], [(q.packed, q.block_scale, q.tensor_scale)] * 2
    weights = {"one": one, "two": two, "uneven": one + [(wide.packed, wide.block_scale, wide.tensor_scale)]}
    x = torch.randn(48).bfloat16()
    call = dict(kwargs, weights=weights[kwargs["weights"]])
    if "residual" in kwargs:
        call["residual"] = torch.zeros(kwargs["residual"]).bfloat16()
    if kwargs.get("norm"):
        call["norm"] = torch.ones(48).bfloat16()
    with pytest.raises(QwenlabError, match=re.escape(message)):
        layer_gemv(x, **call)


@interpreted
@pytest.mark.parametrize("n,k,dtype,per_row,bias,offset", [(37, 80, torch.bfloat16, True, True, 0),
                                                           (20, 48, torch.float32, False, False, 0),
                                                           (9, 528, torch.float16, False, True, 0),
                                                           (11, 1040, torch.bfloat16, False, False, 1),
                                                           (13, 2064, torch.float32, True, True, 0)])
def test_gemv_matches_a_float64_matmul_interpreted(n, k, dtype, per_row, bias, offset):
    check_gemv(n, k, dtype, per_row, bias, "cpu", seed=n + k, offset=offset)


@interpreted
@pytest.mark.parametrize("ns,k,dtype", [((37, 9, 9), 80, torch.bfloat16), ((20, 13), 48, torch.float32),
                                        ((5, 3, 7), 528, torch.float16)])
def test_gemv_parts_match_float64_matmuls_interpreted(ns, k, dtype):
    check_gemv_parts(ns, k, dtype, "cpu", seed=sum(ns) + k)


@interpreted
@pytest.mark.parametrize("x_vec,flat", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("ns,k", [((37,), 528), ((21, 9, 9), 1040), ((13,), 2064), ((13,), 2576)])
def test_gemv_layouts_match_a_float64_matmul_interpreted(ns, k, x_vec, flat):
    """Every way the GEMV lays out a step (x read as a word's 8 values in one load and split, or pair by pair; the
    words as [blocks, 2] or as one flat axis), one weight, split-K (13 rows; 2576: K/16 odd, a masked tail) and
    parts."""
    from qwenlab.quant.triton_nvfp4 import gemv_with_config

    gen = torch.Generator().manual_seed(k)
    parts = [codec.quantize(torch.randn(n, k, generator=gen) * 0.02) for n in ns]
    x = torch.randn(1, k, generator=gen).bfloat16()
    ref = torch.cat([x.double().reshape(k) @ reference([q]).T for q in parts])
    y = gemv_with_config(x, [(q.packed, q.block_scale, q.tensor_scale) for q in parts],
                         {"BLOCK_N": 4, "GROUPS": 16, "X_VEC": x_vec, "FLAT": flat, "num_warps": 1,
                          "num_stages": 1})
    assert rel_l2(y.reshape(-1), ref) < TOLERANCE[torch.bfloat16]


def test_gemv_splits_k_only_where_rows_are_few():
    assert [gemv_split(n, k) for n, k in [(151936, 2560), (6144, 2560), (2560, 9728), (1024, 2560), (13, 2064),
                                          (40, 48)]] == [1, 1, 4, 2, 2, 1]


@interpreted
@pytest.mark.parametrize("m,n,k,per_row,bias", [(5, 37, 80, True, True), (19, 20, 144, False, False)])
def test_gemm_matches_a_float64_matmul_interpreted(m, n, k, per_row, bias):
    # float16 only: the interpreter (Triton 3.9) multiplies bfloat16 dot operands as their raw 16-bit integers
    check_gemm(m, n, k, torch.float16, per_row, bias, "cpu", seed=m + n + k)


@interpreted
@pytest.mark.parametrize("n,k,dtype,per_row", [(37, 80, torch.float16, True), (33, 272, torch.float32, False)])
def test_dequantize_into_is_bit_identical_to_codec_interpreted(n, k, dtype, per_row):
    # not bfloat16: the interpreter (Triton 3.9) truncates float32 -> bfloat16 where the GPU rounds to nearest even
    check_dequantize_into(n, k, dtype, per_row, "cpu", seed=n + k)


def test_every_autotuned_kernel_tunes_briefly_and_once_per_machine():
    """The first graph capture of a report's notebook spent 41 s autotuning the bf16 GEMV's 48 tiles on the Qwen3-4B
    shapes, again in every notebook process: each autotuner times tiles with the brief benchmark and keeps the
    choice in Triton's disk cache (off only under TRITON_INTERPRET, where Triton never caches)."""
    import triton.runtime.autotuner as autotuner

    from qwenlab.generation import gemv
    from qwenlab.quant import triton_nvfp4
    from qwenlab.quant.autotuning import brief_bench

    tuners = [k for module in (gemv, triton_nvfp4) for k in vars(module).values()
              if isinstance(k, autotuner.Autotuner)]
    assert len(tuners) == 3, tuners  # the bf16 GEMV, the NVFP4 GEMV and GEMM
    for tuner in tuners:
        assert tuner._do_bench is brief_bench, tuner.base_fn.__name__
        assert tuner.cache_results or os.environ.get("TRITON_INTERPRET") == "1", tuner.base_fn.__name__


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                    reason="Triton kernels: CUDA, or TRITON_INTERPRET=1")
@torch.inference_mode()
def test_a_prefill_multiplies_unfused_nvfp4_projections_as_one_weight(monkeypatch):
    """q/k/v of an NVFP4 model in a prefill (more than one row): one dequantize launch into one transient weight and
    one matmul (qwenlab.quant.linear.multiply_parts), each output as the module's own forward computes it; one row,
    or a module with a hook of its own or global, goes module by module."""
    from qwenlab.quant import triton_nvfp4
    from qwenlab.quant.linear import NVFP4Linear, multiply_parts

    device = "cpu" if INTERPRETED else "cuda"
    dtype = torch.float32 if INTERPRETED else torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    mods = tuple(NVFP4Linear.from_weight(codec.quantize(torch.randn(n, 80, generator=gen) * 0.02), kernel="triton")
                 .to(device) for n in (48, 16, 16))
    launches = []
    real = triton_nvfp4.dequantize_parts_into
    monkeypatch.setattr(triton_nvfp4, "dequantize_parts_into", lambda out, w: launches.append(len(w)) or real(out, w))
    x = torch.randn(1, 5, 80, generator=gen).to(device, dtype)
    outs = multiply_parts(mods, x)
    assert launches == [3]
    for out, module in zip(outs, mods):
        own = module(x)  # dequantize_into its own weight, then its own matmul
        assert out.shape == own.shape == (1, 5, module.out_features) and out.dtype == dtype
        assert rel_l2(out, own.double()) < TOLERANCE[dtype]
    launches.clear()
    multiply_parts(mods, x[:, :1])  # one row: each module's GEMV
    handle = mods[1].register_forward_hook(lambda module, args, out: out * 0)
    hooked = multiply_parts(mods, x)
    assert launches == [1, 1, 1] and torch.equal(hooked[1], torch.zeros_like(hooked[1]))
    handle.remove()
    launches.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: out * 0)
    try:  # a global hook fires on each module, so they go one by one too
        hooked = multiply_parts(mods, x)
    finally:
        handle.remove()
    assert launches == [1, 1, 1] and all(torch.equal(out, torch.zeros_like(out)) for out in hooked)


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                    reason="Triton kernels: CUDA, or TRITON_INTERPRET=1")
@torch.inference_mode()
def test_a_prefill_dequantizes_each_nvfp4_layer_in_one_launch(tiny_dir, monkeypatch):
    """A prefill of an NVFP4 model (W4A16 Triton linears): each decoder layer's seven weights in one dequantize
    launch (qwenlab.model.projection.PrefillLayer), and the logits those of the torch path (codec.dequantize, then
    the matmul: what the loader runs where there is no CUDA). A layer with a hooked projection goes module by module
    (q/k/v and gate/up one launch each, o and down their own); a one-token step launches no dequantize (the GEMV)."""
    from qwenlab.model.loader import load
    from qwenlab.quant import triton_nvfp4
    from qwenlab.quant.linear import NVFP4Linear

    device = "cpu" if INTERPRETED else "cuda"
    dtype = "float32" if INTERPRETED else "bfloat16"
    triton_model = load(tiny_dir, dtype, device, quant="nvfp4").model
    torch_model = load(tiny_dir, dtype, device, quant="nvfp4").model
    for m in triton_model.modules():
        if isinstance(m, NVFP4Linear):
            m.kernel = "triton"
    triton_model.quantization.kernel = "triton"
    for m in torch_model.modules():
        if isinstance(m, NVFP4Linear):
            m.kernel = "dequantize"
    launches = []
    real = triton_nvfp4._launch
    monkeypatch.setattr(triton_nvfp4, "_launch", lambda plan, out: launches.append(plan.parts) or real(plan, out))
    ids = torch.arange(3, 9, device=device)
    logits = triton_model(ids)
    layers = len(triton_model.model.layers)
    assert launches == [7] * layers
    assert rel_l2(logits, torch_model(ids).double()) < TOLERANCE[triton_model.dtype]
    launches.clear()
    handle = triton_model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda module, args, out: out)
    try:
        hooked = triton_model(ids)
    finally:
        handle.remove()
    assert launches == [3, 1, 2, 1] + [7] * (layers - 1)
    assert torch.equal(hooked, logits)
    launches.clear()
    triton_model(ids[:1])
    assert launches == []


@pytest.mark.skipif(INTERPRETED or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@torch.inference_mode()
def test_every_launcher_runs_on_the_device_of_its_weights_not_the_current_one():
    """A layer of a model split across GPUs: weights and x on the second GPU while the first is current. Each
    launcher runs there and leaves the current device as it was: the GEMV of 1-3 weights, the GEMM and the fused
    layer's GEMVs (plain, with a residual, and on Hopper gate/up with the norm and SiLU x up) against a float64
    matmul, the dequantize plan bit for bit against codec.dequantize."""
    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    gen = torch.Generator(device).manual_seed(2)
    packed, block_scale, tensor_scale, parts = fused_weight(96, 256, False, device, gen)
    weight = reference(parts)
    x = torch.randn(256, device=device, generator=gen).bfloat16()
    ref = x.double() @ weight.T
    results = {"nvfp4_gemv": nvfp4_gemv(x, packed, block_scale, tensor_scale),
               "nvfp4_gemv_parts": nvfp4_gemv_parts(x, [packed], [block_scale], [tensor_scale]),
               "nvfp4_gemm": nvfp4_gemm(x.repeat(3, 1), packed, block_scale, tensor_scale)[1],
               "layer_gemv": layer_gemv(x, [(packed, block_scale, tensor_scale)]),
               "layer_gemv residual": layer_gemv(x, [(packed, block_scale, tensor_scale)],
                                                 residual=torch.zeros(96, dtype=torch.bfloat16, device=device))}
    for name, y in results.items():
        assert y.device == device and rel_l2(y.reshape(96), ref) < TOLERANCE[torch.bfloat16], name
    if torch.cuda.get_device_capability(device) >= (9, 0):  # gate/up on tensor cores: bf16x2 multiplies
        g = torch.ones(256, dtype=torch.bfloat16, device=device)
        normed = (x.float() * torch.rsqrt(x.float().pow(2).mean() + 1e-6)).bfloat16()
        gate, up = normed.double() @ weight.T, normed.double() @ (2 * weight).T
        both = [(packed, block_scale, tensor_scale), (packed, block_scale, 2 * tensor_scale)]
        y = layer_gemv(x, both, norm=g, eps=1e-6, glu=True)
        assert y.device == device and rel_l2(y, torch.nn.functional.silu(gate) * up) < TOLERANCE[torch.bfloat16]
    out = torch.empty(96, 256, dtype=torch.bfloat16, device=device)
    assert torch.equal(dequantize_into(out, packed, block_scale, tensor_scale), reference(parts, torch.bfloat16))
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
def test_the_dequantize_kernel_compiles_to_16_byte_stores_when_its_plan_is_aligned():
    """Compiled for sm_90 without a GPU: the weights' addresses, strides and K come from the plan's table, so only
    the hints of an aligned plan let the tile store 16 bytes at a time (and load the packed codes 8 at a time); an
    unaligned plan (checked when it is made) stores element by element."""
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwenlab.quant import triton_nvfp4

    signature = {"PLAN": "*i64", "OUT": "*bf16", "PARTS": "constexpr", "ALIGNED": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_K": "constexpr"}
    ops = {}
    for aligned in (True, False):
        source = ASTSource(triton_nvfp4._dequantize_kernel, signature,
                           constexprs={"PARTS": 7, "ALIGNED": aligned, "BLOCK_N": triton_nvfp4.DEQUANT_BLOCK_N,
                                       "BLOCK_K": triton_nvfp4.DEQUANT_BLOCK_K},
                           attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        ops[aligned] = set(re.findall(r"\b((?:ld|st)\.global[\w.]*)", ptx))
    assert {"st.global.v4.b32", "ld.global.v2.b32"} <= ops[True]
    assert "st.global.v4.b32" not in ops[False] and "st.global.b16" in ops[False]
