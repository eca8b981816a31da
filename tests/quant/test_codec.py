"""The NVFP4 codec against torchao (torchao.prototype.mx_formats), bit for bit: packed bytes, block scales, per-tensor
scale and dequantized values, on several shapes, dtypes and the awkward blocks."""
import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.quant import codec, e2m1, fp4_gemm

nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
NVFP4Tensor, per_tensor_amax_to_scale = nvfp4_tensor.NVFP4Tensor, nvfp4_tensor.per_tensor_amax_to_scale


def torchao_quantize(x: torch.Tensor, tensor_scale=None):
    """torchao's two-level NVFP4 of x (bf16/fp32 only in torchao: other dtypes go through float32, exactly)."""
    if tensor_scale is None:
        tensor_scale = per_tensor_amax_to_scale(x.float().abs().amax())
    data = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
    return NVFP4Tensor.to_nvfp4(data, per_tensor_scale=tensor_scale)


def assert_bit_exact(x: torch.Tensor, tensor_scale=None):
    ours = codec.quantize(x, tensor_scale)
    ref = torchao_quantize(x, ours.tensor_scale if tensor_scale is not None else None)
    assert torch.equal(ours.packed, ref.qdata), "packed bytes differ"
    assert torch.equal(ours.block_scale.view(torch.uint8), ref.scale.view(torch.uint8)), "block scales differ"
    assert torch.equal(ours.tensor_scale, ref.per_tensor_scale.reshape(())), "per-tensor scale differs"
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(codec.dequantize(ours, dtype), ref.dequantize(dtype)), f"dequantized {dtype} differs"
    return ours


def test_torchao_is_the_ground_truth_here():
    assert nvfp4_tensor.NVFP4Tensor is not None and callable(per_tensor_amax_to_scale)


@pytest.mark.parametrize("shape", [(1, 16), (7, 32), (64, 64), (96, 160), (256, 1024), (33, 2560)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_tensors(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3
    assert_bit_exact(x.to(dtype))


def test_heavy_tails_and_per_row_scales():
    torch.manual_seed(1)
    x = torch.distributions.StudentT(2.0).sample((128, 256)) * torch.logspace(-3, 2, 128)[:, None]
    assert_bit_exact(x)


def test_values_at_and_beyond_the_block_amax():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=gen)
    x[0, :16] = 5.0  # every element is the block amax
    x[1, 3] = 1e4  # one outlier dominating its block and the tensor
    x[2, :16] = torch.linspace(-7, 7, 16)
    assert_bit_exact(x)
    # a calibrated tensor scale smaller than amax / 2688: block scales clamp at 448, values saturate at +-6
    small = torch.tensor(float(x.abs().max()) / 2688 / 10)
    q = assert_bit_exact(x, small)
    assert q.block_scale.float().max() == 448.0
    assert e2m1.decode(e2m1.unpack(q.packed)).abs().max() == 6.0


def test_all_zero_blocks_and_an_all_zero_tensor():
    x = torch.randn(4, 48)
    x[1] = 0.0
    x[2, 16:32] = 0.0
    x[3, :16] = -0.0
    q = assert_bit_exact(x)
    assert torch.equal(codec.dequantize(q)[1], torch.zeros(48))
    zeros = torch.zeros(3, 32)
    q = codec.quantize(zeros)
    assert q.tensor_scale.item() == 1.0  # amax 0: tensor scale 1 (amax / 2688 would make every scale 0/0)
    ref = torchao_quantize(zeros, torch.tensor(1.0))
    assert torch.equal(q.packed, ref.qdata) and torch.equal(codec.dequantize(q), torch.zeros(3, 32))


def test_subnormal_range_values():
    x = torch.randn(6, 64)
    x[0, :16] = torch.tensor(1e-40)  # float32 subnormals
    x[1, :16] = x.abs().max() * 1e-7  # a block far below the tensor's amax: its scale clamps at 2^-6
    x[2, :16] = torch.linspace(-1e-30, 1e-30, 16)
    x[3, 16:32] = x[3, 16:32].sign() * 0.5 * x[3, 16:32].abs().max() / 6  # E2M1's subnormal (code 1) region
    assert_bit_exact(x)
    assert_bit_exact(x.to(torch.bfloat16))


def test_grid_ties_round_to_the_even_code():
    """Block amax 6 with tensor scale 1: block scale 1.0 exactly, so the values below land on E2M1 midpoints."""
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    block = torch.tensor([6.0] + mids + [-m for m in mids] + [0.0])
    q = assert_bit_exact(block[None], torch.tensor(1.0))
    values = e2m1.decode(e2m1.unpack(q.packed))[0].tolist()
    assert values[1:8] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert values[8:15] == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]


def test_e2m1_codes_match_torchao():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(e2m1.decode(codes), kernels.f4_unpacked_to_f32(codes))
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(10000, generator=gen) * 14 - 7).float()
    x = torch.cat([x, torch.tensor([0.0, -0.0, 6.0, -6.0, 0.25, -0.25, 5.0, 7.5, -1e-9])])
    assert torch.equal(e2m1.encode(x.clamp(-6, 6)), kernels.f32_to_f4_unpacked(x.clamp(-6, 6)))


def test_pack_and_unpack_match_torchao():
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    packed = e2m1.pack(codes)
    assert torch.equal(packed, kernels.pack_uint4(codes))
    assert torch.equal(e2m1.unpack(packed), kernels.unpack_uint4(packed.contiguous()))
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # the even element in the low nibble


def test_fake_quantize_is_torchao_quantize_dequantize():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 64, generator=gen)
    flat = x.reshape(-1, 64)
    ref = torchao_quantize(flat).dequantize(torch.float32).reshape(x.shape)
    assert torch.equal(codec.fake_quantize(x), ref)
    scale = torch.tensor(0.002)
    assert torch.equal(codec.fake_quantize(x, scale), torchao_quantize(flat, scale).dequantize().reshape(x.shape))


def test_scale_layout_for_scaled_mm_matches_torchao():
    utils = pytest.importorskip("torchao.prototype.mx_formats.utils")
    for rows, cols in ((128, 4), (200, 10), (7, 160)):
        scale = torch.randint(0, 120, (rows, cols), dtype=torch.uint8).view(torch.float8_e4m3fn)
        assert torch.equal(fp4_gemm.to_blocked(scale).view(torch.uint8), utils.to_blocked(scale).view(torch.uint8))
    assert not fp4_gemm.available("cpu")


def test_worked_example_of_doc_nvfp4():
    """The block of doc/nvfp4.md, byte by byte."""
    block = torch.tensor([[0.1, -0.25, 0.3, 1.2, -0.6, 0.05, 0.0, 0.45, -1.2, 0.9, 0.2, -0.15, 0.7, -0.35, 0.5, 0.15]])
    q = codec.quantize(block)
    assert_bit_exact(block)
    assert q.tensor_scale.item() == pytest.approx(1.2 / 2688)
    assert q.block_scale.float().item() == 448.0
    assert e2m1.unpack(q.packed)[0].tolist() == [1, 10, 3, 7, 13, 0, 0, 4, 15, 6, 2, 9, 5, 11, 4, 1]
    assert q.packed[0].tolist() == [0xA1, 0x73, 0x0D, 0x40, 0x6F, 0x92, 0xB5, 0x14]


@pytest.mark.parametrize("shape", [(4, 40), (4, 8), (16,)])
def test_k_not_a_multiple_of_16_is_refused(shape):
    with pytest.raises(QwenlabError, match="multiple of 16|2-D"):
        codec.quantize(torch.randn(shape))


def test_non_finite_values_are_refused():
    x = torch.randn(2, 16)
    x[1, 3] = float("nan")
    with pytest.raises(QwenlabError, match="NaN or infinite"):
        codec.quantize(x, where="model.layers.0.mlp.up_proj.weight")
