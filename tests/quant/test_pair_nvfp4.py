"""The fused layer's NVFP4 GEMV on tensor cores (qwenlab.quant.pair_nvfp4). On the CPU: its inline PTX run through a
small emulator, up to the MMAs, over every code and E4M3 scales from subnormal to 448 (each decoded pair is
e2m1 x scale x 2^-10, exactly), then each lane's share of the two MMAs summed with x staged as _stage_x stages it
(the same dot product as the unpermuted one), and the kernel compiled for sm_90 (tensor-core MMAs and shared-memory
x in its loop, no spills). On CUDA: the GEMV against a float64 matmul, subnormal block scales among the weights,
and with the input norm as the fused layer's q/k/v runs it, whole or split along K.
The fused layer built on it is tested against float64 in tests/generation/test_fused_layer.py.
"""
import itertools
import re

import pytest
import torch

from qwenlab.quant import codec
from tests.quant.nvfp4_weights import weights_with_subnormal_scales

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from qwenlab.quant import pair_nvfp4, triton_nvfp4  # noqa: E402

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
SCALE_BYTES = [0x38, 0x01, 0x07, 0x08, 0x7E, 0x45, 0x00]  # 1.0, subnormals, the least normal, 448, 0.078125, zero


def e2m1(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * E2M1[code & 7]


def bf16_bits(value: float) -> int:
    return int(torch.tensor([value]).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def bf16_pair(bits: int) -> tuple[float, float]:
    halves = torch.tensor([bits & 0xFFFF, bits >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return float(halves[0]), float(halves[1])


def run_to_the_mmas(word_lo: int, word_hi: int, scale_lo: float, scale_hi: float) -> tuple[dict, list]:
    """Executes pair_nvfp4.PAIR_MMA_ASM up to its MMAs: the registers then, and the MMA lines' operand lists
    (A, B) as register names. Only the instructions it uses before them: cvt.rn.bf16x2.f32, mov, shl, shr, and,
    or (b32), mul.rn.bf16x2."""
    regs = {"$4": word_lo, "$5": word_hi, "$6": scale_lo, "$7": scale_hi}
    mmas = []

    def value(token):
        return int(token, 16) if token.startswith("0x") else int(token) if token.isdigit() else regs[token]

    for line in pair_nvfp4.PAIR_MMA_ASM.value.splitlines():
        line = line.strip()
        if line.startswith("mma."):
            a, b = re.findall(r"\{([^}]*)\}", line)[1:3]
            mmas.append(([r.strip() for r in a.split(",")], [r.strip() for r in b.split(",")]))
            continue
        m = re.match(r"(\S+)\s+(\S+),\s*(\S+)(?:,\s*(\S+))?;", line)
        if not m or m.group(1) == ".reg":
            continue
        op, dest, a, b = m.groups()
        if op == "cvt.rn.bf16x2.f32":
            out = bf16_bits(regs[a]) << 16 | bf16_bits(regs[b])
        elif op == "mov.b32":
            out = value(a)
        elif op == "shl.b32":
            out = (value(a) << value(b)) & 0xFFFFFFFF
        elif op == "shr.b32":
            out = value(a) >> value(b)
        elif op == "and.b32":
            out = value(a) & value(b)
        elif op == "or.b32":
            out = value(a) | value(b)
        elif op == "mul.rn.bf16x2":
            x, y = (torch.tensor(bf16_pair(value(t))).to(torch.bfloat16).float() for t in (a, b))
            product = (x * y).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
            out = int(product[0]) | int(product[1]) << 16
        else:
            raise AssertionError(f"the emulator does not know {op}")
        regs[dest] = out
    return regs, mmas


def scale_value(byte: int) -> float:
    return float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("scale_byte", SCALE_BYTES)
def test_the_inline_ptx_decodes_every_code_to_e2m1_times_scale_exactly(scale_byte):
    """a0..a3 hold the pairs (3, 7), (2, 6), (1, 5), (0, 4) of the low row's word, a4..a7 the high row's, each
    element e2m1 x its block scale x 2^-10 with no rounding (the scale comes in as float32 x SCALE_BIAS)."""
    scale = scale_value(scale_byte)
    scaled = scale * pair_nvfp4.SCALE_BIAS.value
    assert float(torch.tensor([scaled]).to(torch.bfloat16)) == scaled  # exact as a bf16, subnormal E4M3 too
    seen = set()
    for word_lo, word_hi in [(0x76543210, 0xFEDCBA98), (0x9F1E0C8B, 0x11111111), (0x00000000, 0x99999999)]:
        regs, _ = run_to_the_mmas(word_lo, word_hi, scaled, scaled)
        for row, word in enumerate((word_lo, word_hi)):
            for i in range(4):
                got = bf16_pair(regs[f"a{4 * row + i}"])
                for half, element in enumerate((3 - i, 7 - i)):
                    code = (word >> (4 * element)) & 0xF
                    assert got[half] == e2m1(code) * scale * 2.0 ** -10, (hex(word), element, got[half])
                    seen.add(code)
    assert seen == set(range(16))


def test_each_lanes_share_of_the_mmas_is_its_words_dot_product_with_x_staged_as_stage_x_stages_it():
    """The MMAs take A pairs and x pairs side by side: with x's pair i = (x_(3-i), x_(7-i)) (what _stage_x stores),
    the low row's products (A operands 0 and 2 with B 0 and 1) and the high row's (A 1 and 3) sum to the word's
    unpermuted dot products, x 2^-10."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, generator=gen).to(torch.bfloat16).double()
    pairs = [(float(x[3 - i]), float(x[7 - i])) for i in range(4)]  # $8..$11
    scale = scale_value(0x40)
    word_lo, word_hi = 0x9F1E0C8B, 0x76543210
    regs, mmas = run_to_the_mmas(word_lo, word_hi, scale * pair_nvfp4.SCALE_BIAS.value,
                                 scale * pair_nvfp4.SCALE_BIAS.value)
    assert len(mmas) == 2
    sums = [0.0, 0.0]
    for a, b in mmas:
        for row, (a_lo_k, a_hi_k) in enumerate(((a[0], a[2]), (a[1], a[3]))):  # row g, row g + 8
            for a_reg, b_reg in ((a_lo_k, b[0]), (a_hi_k, b[1])):
                x_pair = pairs[int(b_reg.lstrip("$")) - 8]
                w_pair = bf16_pair(regs[a_reg])
                sums[row] += w_pair[0] * x_pair[0] + w_pair[1] * x_pair[1]
    for row, word in enumerate((word_lo, word_hi)):
        want = sum(e2m1((word >> (4 * e)) & 0xF) * scale * float(x[e]) for e in range(8)) * 2.0 ** -10
        assert sums[row] == pytest.approx(want, rel=1e-12, abs=1e-30)


def test_the_kernel_compiles_for_hopper_to_tensor_core_mmas_without_spills():
    """Compiled for sm_90 without a GPU (Triton bundles ptxas), as the fused layer's four GEMVs, with x staged a
    step at a time and in one pass (ONCE): the loop along K multiplies on tensor cores (two MMAs a word) and reads
    x from shared memory, and nothing spills to local memory."""
    pytest.importorskip("triton.backends.nvidia")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from nvfp4_gemv_sass import LAYER_GEMVS, compile_pair, loop_instructions, sass_text

    for (label, parts, split, _, pro, glu, res), once in itertools.product(LAYER_GEMVS, (False, True)):
        kernel, words = compile_pair(parts, split, pro, glu, res, arch=90, once=once)
        if kernel is None:
            pytest.skip("this Triton cannot compile Gluon for sm_90 here")
        label = f"{label}{' once' if once else ''}"
        body = [op.split(".")[0] for op in loop_instructions(kernel.asm["cubin"], "/tmp/qwenlab_test_pair.cubin")]
        # 2 MMAs a word pair (rows g and g + 8): one a word, times the loop's unrolling (ptxas of CUDA 13 unrolls 4)
        assert body.count("HMMA") and body.count("HMMA") % words == 0, label
        assert "LDS" in body, label
        assert not {"STL", "LDL"} & set(re.findall(r"\b([A-Z]{3})\.", sass_text(kernel.asm["cubin"],
                                                                            "/tmp/qwenlab_test_pair.cubin"))), label


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="pair_nvfp4 multiplies bf16x2 (sm_90+) and is Gluon: a Hopper GPU or newer")
@pytest.mark.parametrize("ns,k,split", [((4096, 1024, 1024), 2560, 1), ((2560,), 9728, 4), ((40, 24), 48, 1),
                                        ((1000,), 2576, 2), ((9728, 9728), 2560, 1)])
@torch.inference_mode()
def test_the_pair_gemv_matches_a_float64_matmul_on_cuda(ns, k, split):
    """1-3 weights in one launch (two of 9728 rows: gate/up's shapes), split along K and summed by the kernel (the
    last program's slice short of a whole step), K not a whole step, rows not a whole tile; subnormal block scales
    in the first eighth of each weight's rows."""
    gen = torch.Generator("cuda").manual_seed(sum(ns) + k)
    parts = weights_with_subnormal_scales(ns, k, gen)
    x = torch.randn(k, device="cuda", generator=gen).bfloat16()
    ref = torch.cat([x.double() @ codec.dequantize(q, torch.float32).double().T for q in parts])
    y = triton_nvfp4.layer_gemv(x, [(q.packed, q.block_scale, q.tensor_scale) for q in parts],
                                config={"PAIRS": True, "VW": 4, "KW": 4, "SPLIT": split})
    assert y.shape == (sum(ns),) and torch.isfinite(y).all()
    for i, n in enumerate(ns):
        start = sum(ns[:i])
        got, want = y[start:start + n].double(), ref[start:start + n]
        assert ((got - want).norm() / want.norm()).item() < 5e-3
        small = slice(start, start + max(n // 8, 1))  # the rows with subnormal scales
        assert ((y[small].double() - ref[small]).norm() / ref[small].norm()).item() < 5e-3


def normed_input(k: int, eps: float, gen: torch.Generator) -> tuple:
    """A bf16 row x [k] and a norm weight g on CUDA, and RMSNorm(x) * g rounded as Qwen3's RMSNorm rounds it (the
    reference the GEMVs with the input norm multiply)."""
    x = (3 * torch.randn(k, device="cuda", generator=gen)).bfloat16()
    g = (1 + 0.2 * torch.randn(k, device="cuda", generator=gen)).bfloat16()
    return x, g, (x.float() * torch.rsqrt(x.float().pow(2).mean() + eps)).bfloat16() * g


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="pair_nvfp4 multiplies bf16x2 (sm_90+) and is Gluon: a Hopper GPU or newer")
@pytest.mark.parametrize("once", [False, True])
@pytest.mark.parametrize("split", [1, 2, 4])
@torch.inference_mode()
def test_the_pair_gemv_with_the_input_norm_matches_a_float64_matmul_also_split_along_k(split, once):
    """q/k/v's GEMV as the fused layer runs it: RMSNorm(x) x the norm's weight as its input, rounded as the forward
    rounds it, three weights in one launch, whole or split along K (every program sums the squares of all of x),
    x staged a step at a time or in one pass (ONCE)."""
    gen = torch.Generator("cuda").manual_seed(split)
    ns, k, eps = (4096, 1024, 1024), 2560, 1e-6
    parts = weights_with_subnormal_scales(ns, k, gen)
    x, g, normed = normed_input(k, eps, gen)
    ref = torch.cat([normed.double() @ codec.dequantize(q, torch.float32).double().T for q in parts])
    y = triton_nvfp4.layer_gemv(x, [(q.packed, q.block_scale, q.tensor_scale) for q in parts], norm=g, eps=eps,
                                config={"PAIRS": True, "SPLIT": split, "ONCE": once})
    assert y.shape == (sum(ns),) and torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="pair_nvfp4 multiplies bf16x2 (sm_90+) and is Gluon: a Hopper GPU or newer")
@pytest.mark.parametrize("once", [False, True])
@pytest.mark.parametrize("k", [2560, 2576])
@torch.inference_mode()
def test_the_pair_gemv_as_gate_up_with_the_input_norm_matches_float64(k, once):
    """gate/up's GEMV as the fused layer runs it: RMSNorm(x) x the norm's weight as its input, gate and up rows in
    one program, written as SiLU(gate) x up; K a whole number of steps (the 4B shape) or not; x staged a step at a
    time or in one pass (ONCE)."""
    gen = torch.Generator("cuda").manual_seed(k)
    ns, eps = (9728, 9728), 1e-6
    parts = weights_with_subnormal_scales(ns, k, gen)
    x, g, normed = normed_input(k, eps, gen)
    gate, up = (normed.double() @ codec.dequantize(q, torch.float32).double().T for q in parts)
    ref = torch.nn.functional.silu(gate) * up
    y = triton_nvfp4.layer_gemv(x, [(q.packed, q.block_scale, q.tensor_scale) for q in parts], norm=g, eps=eps,
                                glu=True, config={"PAIRS": True, "ONCE": once})
    assert y.shape == (ns[0],) and torch.isfinite(y).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 5e-3


def test_the_timing_probe_costs_gate_up_no_register():
    """bench/nvfp4_probe.py's probe (PROBES) stores each reading as it takes it: compiled for sm_90, gate/up's
    GEMV holds as many registers a thread with it as without (128: four programs an SM), so the probe sees the
    occupancy the engine runs at. (A probe that kept its readings to the end took 168: three programs an SM.)"""
    pytest.importorskip("triton.backends.nvidia")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from nvfp4_gemv_sass import compile_pair, registers

    counts = []
    for probe in (False, True):
        kernel, _ = compile_pair(2, 1, True, True, False, arch=90, once=True, ksteps=8, probe=probe)
        if kernel is None:
            pytest.skip("this Triton cannot compile Gluon for sm_90 here")
        counts.append(registers(kernel.asm["cubin"], "/tmp/qwenlab_test_probe.cubin"))
        if probe:
            assert "globaltimer" in kernel.asm["ptx"] and "%smid" in kernel.asm["ptx"]
    assert counts[0] == counts[1] <= 128, counts
