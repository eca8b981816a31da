"""The tensor-core NVFP4 GEMV (qwenlab.quant.mma_nvfp4) against a float64 matmul of codec.dequantize's weight on
CUDA; on the CPU, its inline PTX decode run through a small emulator over every byte and E4M3 scales (subnormal
ones too), and the kernel compiled for sm_90 to check what it compiles to (no shared memory, tensor-core MMA).
"""
import re

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.quant import codec
from tests.quant.nvfp4_weights import weights_with_subnormal_scales

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from qwenlab.quant import mma_nvfp4, triton_nvfp4  # noqa: E402

needs_tensor_cores = pytest.mark.skipif(not torch.cuda.is_available()
                                        or torch.cuda.get_device_capability() < (8, 0),
                                        reason="needs a CUDA GPU of compute capability 8.0 or newer")
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


def run_decode_asm(word: int, scale_pair: int) -> list[int]:
    """Executes mma_nvfp4.DECODE_ASM for one word ($4..$11) and one bf16x2 scale pair ($12..$15): the four output
    registers. Only the instructions it uses: shl, shr, and, or (b32), prmt (default mode), mul.rn.bf16x2."""
    regs = {f"${i}": word for i in range(4, 12)} | {f"${i}": scale_pair for i in range(12, 16)}

    def value(token):
        return int(token, 16) if token.startswith("0x") else int(token) if token.isdigit() else regs[token]

    for line in mma_nvfp4.DECODE_ASM.splitlines():
        m = re.match(r"(\S+)\s+(\S+),\s*(\S+),\s*(\S+)(?:,\s*(\S+))?;", line.strip())
        if not m or m.group(1) == ".reg":
            continue
        op, dest, a, b, c = m.groups()
        a, b = value(a), value(b)
        if op == "shl.b32":
            out = (a << b) & 0xFFFFFFFF
        elif op == "shr.b32":
            out = a >> b
        elif op == "and.b32":
            out = a & b
        elif op == "or.b32":
            out = a | b
        elif op == "prmt.b32":
            pool = (a | (b << 32)).to_bytes(8, "little")
            out = int.from_bytes(bytes(pool[(value(c) >> (4 * i)) & 7] for i in range(4)), "little")
            assert all(not (value(c) >> (4 * i)) & 8 for i in range(4)), "sign-replicate mode not emulated"
        elif op == "mul.rn.bf16x2":
            halves = torch.tensor([a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16], dtype=torch.int32).to(torch.int16)
            x = halves.view(torch.bfloat16)
            product = (x[:2].float() * x[2:].float()).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
            out = int(product[0]) | (int(product[1]) << 16)
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[dest] = out
    return [regs[f"${i}"] for i in range(4)]


def bf16_pair(bits: int) -> tuple[float, float]:
    halves = torch.tensor([bits & 0xFFFF, bits >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return float(halves[0]), float(halves[1])


@pytest.mark.parametrize("scale_byte", [0x38, 0x01, 0x07, 0x08, 0x7E, 0x45])  # 1.0, subnormals, min normal, 448
def test_the_inline_ptx_decodes_every_byte_to_e2m1_times_scale(scale_byte):
    scale = torch.tensor([scale_byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    scaled = (scale * mma_nvfp4.SCALE_UP.value).to(torch.bfloat16)
    assert float(scaled) == float(scale) * 2.0 ** 112  # exact: E4M3 x 2^112 is a normal bf16
    bits = int(scaled.view(torch.int16)) & 0xFFFF
    scale_pair = bits | (bits << 16)
    for word in [0x76543210, 0xFEDCBA98, 0x9F1E0C8B, 0x00000000, 0x11111111, 0x99999999]:
        pairs = run_decode_asm(word, scale_pair)
        for p, pair in enumerate(pairs):  # pair p: elements 2p (low half) and 2p + 1
            got = bf16_pair(pair)
            for half, element in enumerate((2 * p, 2 * p + 1)):
                want = e2m1((word >> (4 * element)) & 0xF) * float(scale) * 2.0 ** -14
                assert got[half] == want, (hex(word), element, got[half], want)


def test_the_decode_covers_all_sixteen_codes():
    seen = set()
    for word in [0x76543210, 0xFEDCBA98]:
        for p, pair in enumerate(run_decode_asm(word, 0x77807780)):  # scale pair 2^112: e2m1 x 2^-14
            for half, element in enumerate((2 * p, 2 * p + 1)):
                seen.add(((word >> (4 * element)) & 0xF, bf16_pair(pair)[half] * 2.0 ** 14))
    assert seen == {(code, e2m1(code)) for code in range(16)}


def test_the_kernel_compiles_for_hopper_without_shared_memory():
    """Compiled for sm_90 without a GPU (Triton bundles ptxas): the A operand comes from registers (no shared
    memory, no barrier, no shuffle in the loop) and the products are tensor-core MMAs."""
    pytest.importorskip("triton.backends.nvidia")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from nvfp4_gemv_sass import compile_mma, loop_instructions

    kernel = compile_mma(32, 128, 2, parts=3, split=2, arch=90)
    if kernel is None:
        pytest.skip("this Triton cannot compile for sm_90 here")
    assert kernel.metadata.shared == 0
    body = loop_instructions(kernel.asm["cubin"], "/tmp/qwenlab_test_mma.cubin")
    ops = [op.split(".")[0] for op in body]
    assert "HMMA" in ops and not {"BAR", "SHFL", "STS", "LDS"} & set(ops)


@needs_tensor_cores
@pytest.mark.parametrize("ns,k,config", [
    ((4096, 1024, 1024), 2560, {"BLOCK_N": 32, "BLOCK_K": 128, "WARPS": 2}),
    ((9728, 9728), 2560, {"BLOCK_N": 64, "BLOCK_K": 256, "WARPS": 4}),
    ((2560,), 9728, {"BLOCK_N": 32, "BLOCK_K": 128, "WARPS": 2, "SPLIT": 8}),
    ((1000, 37), 2576, {"BLOCK_N": 32, "BLOCK_K": 128, "WARPS": 2, "SPLIT": 2}),  # K not a multiple of BLOCK_K
    ((40,), 48, {"BLOCK_N": 16, "BLOCK_K": 64, "WARPS": 1}),
])
def test_mma_gemv_matches_a_float64_matmul_on_cuda(ns, k, config):
    gen = torch.Generator("cuda").manual_seed(sum(ns) + k)
    parts = weights_with_subnormal_scales(ns, k, gen)
    x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
    ref = torch.cat([x.double().reshape(k) @ codec.dequantize(q, torch.float32).double().T for q in parts])
    torch.full((sum(ns),), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison the reused block
    y = triton_nvfp4.gemv_with_config(x, [(q.packed, q.block_scale, q.tensor_scale) for q in parts],
                                      {"MMA": True, **config})
    assert y.shape == (1, sum(ns)) and torch.isfinite(y).all()
    for i, n in enumerate(ns):  # every part in its own rows, the tiny rows too
        start = sum(ns[:i])
        got, want = y.reshape(-1)[start:start + n].double(), ref[start:start + n]
        assert ((got - want).norm() / want.norm()).item() < 5e-3
        small = slice(start, start + max(n // 8, 1))
        assert ((y.reshape(-1)[small].double() - ref[small]).norm() / ref[small].norm()).item() < 5e-3


@needs_tensor_cores
def test_bf16_rows_take_the_tensor_core_gemv_only_when_asked(monkeypatch):
    x = torch.randn(1, 64, device="cuda").bfloat16()
    monkeypatch.delenv("QWENLAB_NVFP4_GEMV", raising=False)
    assert triton_nvfp4.gemv_engine(x) == "wide"  # the default: the fastest on an H200
    monkeypatch.setenv("QWENLAB_NVFP4_GEMV", "mma")
    assert triton_nvfp4.gemv_engine(x) == "mma"
    assert triton_nvfp4.gemv_engine(x.float()) == "fma"  # bf16 rows only
    assert triton_nvfp4.gemv_engine(x, bias=torch.zeros(8, device="cuda")) == "fma"


def test_a_cpu_row_is_never_sent_to_the_tensor_cores(monkeypatch):
    monkeypatch.setenv("QWENLAB_NVFP4_GEMV", "mma")
    assert triton_nvfp4.gemv_engine(torch.zeros(1, 64, dtype=torch.bfloat16)) == "fma"


def test_the_tensor_core_gemv_refuses_what_it_cannot_multiply():
    q = codec.quantize(torch.randn(16, 64))
    with pytest.raises(QwenlabError, match="gemv_with_config: the tensor-core GEMV takes a bf16 row on CUDA"):
        triton_nvfp4.gemv_with_config(torch.randn(1, 64), [(q.packed, q.block_scale, q.tensor_scale)],
                                      {"MMA": True})
