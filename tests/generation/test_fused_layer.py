"""The graph engine's fused decoder layer (qwenlab.generation.fused_layer): its five kernels against the same layer's
forward run in float64 on the same inputs (the layer's own forward is checked against transformers elsewhere), and
which layers it takes (qwenlab.generation.kernels.fits, on the CPU). The kernels run on CUDA, or on the CPU under
Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/generation/test_fused_layer.py
"""
import copy
import os

import pytest
import torch

from qwenlab.generation.kernels import fits
from qwenlab.model.kv_cache import StaticKVCache, StaticLayerKV
from qwenlab.model.loader import load

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                                  reason="Triton kernels: CUDA, or TRITON_INTERPRET=1 on the CPU")


def _static(model, prefill: int, max_len: int = 512):
    """A static cache holding `prefill` positions, switched to one-token static steps, and the next step's inputs."""
    cache = StaticKVCache.for_config(model.config, max_len=max_len, dtype=model.dtype, device=model.device)
    model(torch.arange(3, 3 + prefill, device=model.device), cache=cache)
    cache.static_shapes = True
    positions = cache.positions(1, model.device)
    x = model.model.embed_tokens(torch.tensor([[7]], device=model.device))
    cos, sin = model.model.rotary(positions, model.dtype)
    return cache, x, cos, sin, cache.attention_mask(1)


def _layer_kv(cache, i: int, dtype=None) -> StaticLayerKV:
    k, v = cache.k[i].clone(), cache.v[i].clone()
    if dtype is not None:
        k, v = k.to(dtype), v.to(dtype)
    return StaticLayerKV(k, v, cache._write_at, cache.pos)


def _tiles(model) -> dict:
    """A fixed GEMV tile per shape (the engine takes the autotuner's; the interpreter cannot time tiles). BLOCK_K 64
    is under K for every fixture, so the GEMV's loop runs more than one step and its masked tail."""
    from qwenlab.generation.kernels import layer_weights

    return {tuple(w.shape): (4, 64, 4, 1) for layer in model.model.layers for w in layer_weights(layer)}


def _assert_as_close_to_float64(i: int, out, own, ref, kvs: tuple, pos: int, ulp: float):
    """Layer i's fused output and the key/value it wrote at `pos` (kvs: fused, own, float64 reference caches) err
    against the float64 reference at most twice the layer's own forward plus four units in the last place."""
    scale = ref.abs().max().item()
    own_err, err = (own.double() - ref).abs().max().item(), (out.double() - ref).abs().max().item()
    assert err <= 2 * own_err + 4 * ulp * scale, (i, err, own_err)
    fused, mine, exact = kvs
    for written, own_kv, ref_kv in ((fused.k, mine.k, exact.k), (fused.v, mine.v, exact.v)):
        slot_ref, slot_scale = ref_kv[:, :, pos], ref_kv[:, :, pos].abs().max().item()
        own_slot_err = (own_kv[:, :, pos].double() - slot_ref).abs().max().item()
        slot_err = (written[:, :, pos].double() - slot_ref).abs().max().item()
        assert slot_err <= 2 * own_slot_err + 4 * ulp * slot_scale, (i, slot_err, own_slot_err)


@runs_kernels
@pytest.mark.parametrize("tiles", ["fixed", "tuned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fixture", ["tiny_dir", "untied_dir"])
@pytest.mark.parametrize("prefill,slots", [(10, 512), (200, 512), (300, 2048)])
@torch.inference_mode()
def test_fused_layer_is_as_close_to_float64_as_the_layers_own_forward(fixture, dtype, prefill, slots, tiles, request):
    """Every layer of the fixture, one token after `prefill` (10: one chunk of cache slots; 200: four, merged by the
    last program; 300 in 2048 slots: chunks of two blocks, each block's keys read while the one before is scored,
    and a last chunk of one): the fused layer's output and the key/value it writes at `pos` against the layer's
    forward in float64 on the same inputs (the float64 layer reads the same cache and x, upcast), with an error at
    most twice the layer's own forward in `dtype` plus a few units in the last place; every other cache slot
    untouched.
    tiny-untied has head_dim 24 (padded to 32 in the kernel) and 3 query heads per KV head. tiles: a fixed GEMV
    tile, or (CUDA) the autotuner's, launched as the engine launches them (with PDL where the GPU has it)."""
    from qwenlab.generation.fused_layer import FusedLayers, pdl_wanted

    if tiles == "tuned" and not torch.cuda.is_available():
        pytest.skip("the autotuner times tiles on a GPU")

    base = load(request.getfixturevalue(fixture), "float32", DEVICE, fused=True).model
    model, exact = copy.deepcopy(base).to(dtype), copy.deepcopy(base).double()
    cache, x, cos, sin, mask = _static(model, prefill, slots)
    pos = int(cache.pos)
    fused = FusedLayers(tiles=_tiles(model)) if tiles == "fixed" else FusedLayers(pdl_wanted(x.device))
    for i, layer in enumerate(model.model.layers):
        assert fits(layer, x, _layer_kv(cache, i)) is None
        kv_ref, kv_own, kv_fused = _layer_kv(cache, i, torch.float64), _layer_kv(cache, i), _layer_kv(cache, i)
        ref = exact.model.layers[i](x.double(), cos.double(), sin.double(), mask, kv_ref, "eager", None)
        own = layer(x, cos, sin, mask, kv_own, "eager", None)
        out = fused.layer(layer, x, cos, sin, kv_fused)
        assert out.dtype == dtype and out.shape == x.shape
        _assert_as_close_to_float64(i, out, own, ref, (kv_fused, kv_own, kv_ref), pos, torch.finfo(dtype).eps)
        for written, before in ((kv_fused.k, cache.k[i]), (kv_fused.v, cache.v[i])):
            others = torch.ones(written.shape[2], dtype=torch.bool)
            others[pos] = False
            assert torch.equal(written[:, :, others], before[:, :, others])
        x = own


@runs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prefill", [10, 200])
@torch.inference_mode()
def test_the_nvfp4_fused_layer_computes_what_the_layers_forward_computes(tiny_dir, dtype, prefill):
    """A W4A16 NVFP4 layer (q/k/v and gate/up one GEMV launch each, norms and residual adds as small kernels, the
    fused attention) against the same layer's forward on the same inputs, whose linears run the same NVFP4 GEMV one
    by one: within four units in the last place of the output's scale, and the same key/value written at `pos`
    (under the interpreter, whose bf16 casts truncate, within those units too). On the CPU the NVFP4 linears are
    made to take the Triton GEMV (the loader picks it only on CUDA), which the interpreter runs."""
    from qwenlab.generation.fused_layer import FusedLayers
    from qwenlab.generation.kernels import layer_kind
    from qwenlab.quant.linear import NVFP4Linear
    from qwenlab.quant.triton_nvfp4 import nvfp4_gemv_parts

    model = load(tiny_dir, dtype, DEVICE, quant="nvfp4").model
    if DEVICE == "cpu":
        for m in model.modules():
            if isinstance(m, NVFP4Linear):
                m.kernel = "triton"
    cache, x, cos, sin, mask = _static(model, prefill)
    pos, ulp = int(cache.pos), torch.finfo(model.dtype).eps
    fused = FusedLayers(nvfp4_parts=nvfp4_gemv_parts)
    for i, layer in enumerate(model.model.layers):
        kv_own, kv_fused = _layer_kv(cache, i), _layer_kv(cache, i)
        assert layer_kind(layer) == "nvfp4" and fits(layer, x, kv_fused) is None
        own = layer(x, cos, sin, mask, kv_own, "eager", None)
        out = fused.layer(layer, x, cos, sin, kv_fused)
        scale = own.abs().max().item()
        assert (out - own).abs().max().item() <= 4 * ulp * scale, i
        for written, expected in ((kv_fused.k, kv_own.k), (kv_fused.v, kv_own.v)):
            slot_scale = expected[:, :, pos].abs().max().item()
            assert (written[:, :, pos] - expected[:, :, pos]).abs().max().item() <= 4 * ulp * slot_scale, i
        x = own


def _nvfp4_4b_layer(dtype):
    """One decoder layer of the Qwen3-4B shape on CUDA (random weights and norm weights), its seven projections
    quantized to NVFP4 and run by the Triton kernels: the GEMVs' real tiles, splits and even/odd K."""
    from qwenlab.model.config import config_from_dict
    from qwenlab.model.qwen3 import Qwen3, RMSNorm
    from qwenlab.model.tiny import config_json
    from qwenlab.quant import codec
    from qwenlab.quant.linear import NVFP4Linear

    torch.manual_seed(0)
    model = Qwen3(config_from_dict(config_json("qwen3-4b", num_hidden_layers=1, vocab_size=512))).to("cuda", dtype)
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and ".layers." in name:  # the NVFP4 buffers keep their own dtypes
            torch.nn.init.normal_(module.weight, std=0.02)
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr,
                    NVFP4Linear.from_weight(codec.quantize(module.weight.float()), kernel="triton"))
        elif type(module) is RMSNorm:
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def _dequantized(layer, dtype):
    """The layer with each NVFP4 linear replaced by a plain one holding its dequantized weight, in `dtype`."""
    from qwenlab.quant.linear import NVFP4Linear

    exact = copy.deepcopy(layer)
    for name, module in list(exact.named_modules()):
        if isinstance(module, NVFP4Linear):
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=False, device=module.packed.device)
            plain.weight.data = module.dequantize_weight(torch.float32)
            parent, attr = name.rsplit(".", 1)
            setattr(exact.get_submodule(parent), attr, plain)
    return exact.to(dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the wide-load layer GEMV is Gluon: CUDA only")
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fixture", ["tiny_dir", "untied_dir", "qwen3-4b"])
@torch.inference_mode()
def test_the_five_kernel_nvfp4_layer_is_as_close_to_float64_as_the_layers_own_forward(fixture, dtype, pdl, pairs,
                                                                                         request):
    """A W4A16 NVFP4 layer as five kernels (the wide-load layer GEMVs take the input norms, SiLU x up and the
    residual adds; QWENLAB_NVFP4_GEMV=wide, the engine's default on CUDA): its output and the key/value written at
    `pos` against the same layer in float64 on its dequantized weights, with an error at most twice the layer's own
    forward in `dtype` (the NVFP4 linears one GEMV each, norms and adds as torch ops) plus a few units in the last
    place. The fixtures' small K run the GEMVs' masked steps; the Qwen3-4B-shaped layer their tiles as the engine
    runs them (o and down split along K and summed in the kernel, down's K not a whole number of steps). pairs: the
    GEMVs on tensor cores (qwenlab.quant.pair_nvfp4, bf16 only: a float32 layer keeps the wide GEMV), or not."""
    import functools

    from qwenlab.generation.fused_layer import PDL_MODES, FusedLayers, pdl_available
    from qwenlab.quant.triton_nvfp4 import layer_gemv

    if pdl and not pdl_available(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+")
    if fixture == "qwen3-4b":
        model = _nvfp4_4b_layer(dtype)
    else:
        model = load(request.getfixturevalue(fixture), str(dtype).split(".")[1], "cuda", quant="nvfp4").model
    cache, x, cos, sin, mask = _static(model, 40)
    pos = int(cache.pos)
    fused = FusedLayers(pdl=PDL_MODES["after-loop"] if pdl else 0,
                        nvfp4_layer_gemv=functools.partial(layer_gemv, config={"PAIRS": pairs}))
    for i, layer in enumerate(model.model.layers):
        assert fits(layer, x, _layer_kv(cache, i)) is None
        exact = _dequantized(layer, torch.float64)
        kv_ref, kv_own, kv_fused = _layer_kv(cache, i, torch.float64), _layer_kv(cache, i), _layer_kv(cache, i)
        ref = exact(x.double(), cos.double(), sin.double(), mask, kv_ref, "eager", None)
        own = layer(x, cos, sin, mask, kv_own, "eager", None)
        out = fused.layer(layer, x, cos, sin, kv_fused)
        assert out.dtype == dtype and out.shape == x.shape
        _assert_as_close_to_float64(i, out, own, ref, (kv_fused, kv_own, kv_ref), pos, torch.finfo(dtype).eps)
        x = own


@runs_kernels
@torch.inference_mode()
def test_the_merge_of_cache_chunks_is_deterministic_and_leaves_its_counters_at_zero(tiny_dir):
    """300 valid slots of a 512-slot cache: five chunks per KV head, merged by whichever finishes last, in chunk
    order: two calls give the same bits, and each head's counter is back at zero for the next call."""
    from qwenlab.generation.fused_layer import FusedLayers

    model = load(tiny_dir, "float32", DEVICE, fused=True).model
    cache, x, cos, sin, _ = _static(model, 299)
    fused = FusedLayers(tiles=_tiles(model))
    layer = model.model.layers[0]
    first = fused.layer(layer, x, cos, sin, _layer_kv(cache, 0))
    second = fused.layer(layer, x, cos, sin, _layer_kv(cache, 0))
    assert torch.equal(first, second)
    assert not fused.counters[str(x.device)].any()


@torch.inference_mode()
def test_which_layers_the_fused_kernels_take(tiny_dir, moe_dir):
    """A dense fused-projection layer on a one-token static step fits; a prefill, an unfused or NVFP4 or MoE layer,
    a weight in another dtype, an installed hook point function or module hook (its own or global) each say why not
    (the layer then runs its own forward, hooks included)."""
    model = load(tiny_dir, "float32", "cpu", fused=True).model
    cache, x, *_ = _static(model, 4)
    kv = cache.layer(0)
    layer = model.model.layers[0]
    assert fits(layer, x, kv) is None
    assert "one-token step" in fits(layer, torch.zeros(1, 3, x.shape[-1]), kv)
    assert "one-token step" in fits(layer, x, cache.layer(0) if not cache.static_shapes else None)
    unfused = load(tiny_dir, "float32", "cpu").model
    assert "fused linears" in fits(unfused.model.layers[0], x, kv)
    nvfp4 = load(tiny_dir, "float32", "cpu", quant="nvfp4").model
    assert "fused linears" in fits(nvfp4.model.layers[0], x, kv)
    moe = load(moe_dir, "float32", "cpu", fused=True).model
    assert "fused linears" in fits(moe.model.layers[1], x, kv)
    assert "dtype" in fits(layer, x.to(torch.bfloat16), kv)
    layer.self_attn.hook_q_rope.fns.append(lambda t: t)
    assert "hook" in fits(layer, x, kv)
    layer.self_attn.hook_q_rope.fns.clear()
    handle = layer.mlp.down_proj.register_forward_hook(lambda m, args, out: out)
    assert "hook" in fits(layer, x, kv)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: out)
    try:
        assert fits(layer, x, kv) == fits(nvfp4.model.layers[0], x, kv) == "a global module hook is installed"
    finally:
        handle.remove()
    assert fits(layer, x, kv) is None


def test_qwenlab_pdl_chooses_where_each_kernel_lets_the_next_launch(monkeypatch):
    """QWENLAB_PDL: unset or 1 the default placement (after the main loop), 0 none, a PDL_MODES name that one; any
    other value is refused in one line, on any machine. Without PDL (a CPU, Triton's interpreter, before sm_90) 0."""
    pytest.importorskip("triton")
    from qwenlab.errors import QwenlabError
    from qwenlab.generation.fused_layer import PDL_MODES, pdl_available, pdl_wanted

    device = torch.device(DEVICE)
    for value, mode in [("", PDL_MODES["after-loop"]), ("1", PDL_MODES["after-loop"]), ("0", 0),
                        ("start", PDL_MODES["start"]), ("after-wait", PDL_MODES["after-wait"])]:
        monkeypatch.setenv("QWENLAB_PDL", value)
        assert pdl_wanted(device) == (mode if pdl_available(device) else 0)
    monkeypatch.setenv("QWENLAB_PDL", "yes")
    with pytest.raises(QwenlabError, match="QWENLAB_PDL='yes'"):
        pdl_wanted(device)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_the_steps_final_norm_is_one_kernel_rounding_as_the_module(tiny_dir, dtype):
    """DecodeKernels.norm: the final RMSNorm of a one-token step in one kernel, within two units in the last place of
    the module's result (its sum of squares runs in another order, and a unit's difference in x * rstd can carry
    through the rounding after the weight's product); a hooked module or more than one token run the module."""
    from qwenlab.generation.fused_layer import FusedLayers
    from qwenlab.generation.kernels import DecodeKernels

    model = load(tiny_dir, "float32", DEVICE).model.to(dtype)
    norm = model.model.norm
    kernels = DecodeKernels(attend=None, fused=FusedLayers())
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 1, model.config.hidden_size, generator=gen) * 4).to(DEVICE, dtype)
    want = norm(x)
    got = kernels.norm(norm, x)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.double() - want.double()).abs().max() <= 2 * torch.finfo(dtype).eps * want.double().abs().max()
    handle = norm.register_forward_hook(lambda module, args, out: out * 2)
    assert torch.equal(kernels.norm(norm, x), 2 * want)
    handle.remove()
    three = x.expand(1, 3, -1).contiguous()
    assert torch.equal(kernels.norm(norm, three), norm(three))
