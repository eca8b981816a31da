"""What the NVFP4 GEMVs compile to, without a GPU: Triton compiles the kernels for sm_90 (Hopper) on this machine
(its wheel bundles ptxas and cuobjdump), and this prints, per tile and layout, the shared memory, the layout
conversions in the Triton GPU IR, and the instructions of the loop along K per packed int32 word a thread handles,
with the loads, shared-memory traffic, barriers, shuffles and tensor-core MMAs among them: the FMA GEMV
(qwenlab.quant.triton_nvfp4), the tensor-core one (qwenlab.quant.mma_nvfp4, "mma" rows), the wide-load one
(qwenlab.quant.wide_nvfp4, "wide" rows, and as the fused layer's GEMVs, "layer" rows) and the fused layer's GEMVs on
tensor cores from bf16 pairs (qwenlab.quant.pair_nvfp4, "pair" rows: 8 steps of x in shared memory). A development
tool beside bench/nvfp4_gemv_sweep.py, which measures the time on a GPU; counts are no timings.

    python bench/nvfp4_gemv_sass.py [--arch 90]
"""
import argparse
import collections
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qwenlab.quant import triton_nvfp4

CONSTEXPRS = ("PARTS", "X_WORDS", "HAS_BIAS", "SPLIT", "EVEN_K", "X_VEC", "FLAT", "BLOCK_N", "GROUPS", "PDL",
              "PDL_WAIT_FIRST")
POINTERS = {"X": "*i32", "P0": "*i32", "S0": "*fp8e4nv", "TS0": "*fp32", "P1": "*i32", "S1": "*fp8e4nv",
            "TS1": "*fp32", "P2": "*i32", "S2": "*fp8e4nv", "TS2": "*fp32", "B": "*bf16", "Y": "*bf16",
            "PARTIAL": "*fp32"}
DIVISIBLE = {"K", "N0", "N1", "N2", "stride_p0", "stride_s0", "stride_p1", "stride_s1", "stride_p2", "stride_s2"}
# (BLOCK_N, GROUPS, num_warps, X_VEC, FLAT)
TILES = [(4, 32, 1, False, False), (8, 32, 2, False, False), (8, 16, 1, False, False), (4, 32, 1, True, False),
         (4, 32, 1, False, True), (8, 32, 2, False, True), (8, 16, 1, False, True)]


def compile_tile(block_n, groups, warps, x_vec, flat, arch):
    """The kernel for one bf16 row and one weight of Qwen3-4B-like sizes, specialised as at run time (pointers and
    sizes divisible by 16)."""
    jit = triton_nvfp4._gemv_kernel.fn.fn  # autotuner -> heuristics -> the JIT function
    names = jit.arg_names
    signature = {n: POINTERS.get(n, "constexpr" if n in CONSTEXPRS else "i32") for n in names}
    values = dict(PARTS=1, X_WORDS=True, HAS_BIAS=False, SPLIT=1, EVEN_K=True, X_VEC=x_vec, FLAT=flat, PDL=False,
                  PDL_WAIT_FIRST=False,
                  BLOCK_N=block_n, GROUPS=groups)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS or n in DIVISIBLE}
    source = ASTSource(fn=jit, signature=signature, constexprs={(names.index(k),): v for k, v in values.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})


def compile_gluon(jit, values: dict, pointers: dict, warps: int, arch: int):
    """A Gluon kernel compiled for sm_`arch` as at run time: `values` its constexprs, `pointers` its pointer
    arguments' types, pointers and sizes divisible by 16, eps float32, the other arguments int32."""
    from triton.experimental.gluon._runtime import GluonASTSource

    names = jit.arg_names
    signature = {n: pointers.get(n, "constexpr" if n in values else "fp32" if n == "eps" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n in DIVISIBLE}
    source = GluonASTSource(fn=jit, signature=signature, constexprs={(names.index(k),): v for k, v in values.items()},
                            attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


MMA_TILES = [(32, 128, 2), (64, 128, 2), (64, 256, 4), (16, 128, 1)]  # (BLOCK_N, BLOCK_K, warps)


def compile_mma(block_n, block_k, warps, parts=1, split=1, arch=90):
    """The tensor-core GEMV (a Gluon kernel) for bf16 x, specialised as at run time; None where this Triton has
    no Gluon."""
    try:
        import triton.experimental.gluon._runtime  # noqa: F401 - Gluon is there

        from qwenlab.quant import mma_nvfp4
    except ImportError:
        return None
    jit = mma_nvfp4.mma_gemv_kernel
    values = dict(PARTS=parts, SPLIT=split, EVEN_K=True, BLOCK_N=block_n, BLOCK_K=block_k, WARPS=warps,
                  L3=mma_nvfp4.operand_layout(block_n, block_k, warps))
    pointers = {**{n: t for n, t in POINTERS.items() if n != "B"}, "X": "*bf16"}
    return compile_gluon(jit, values, pointers, warps, arch)


WIDE_TILES = [(c["RN"], c["VW"], c["TN"], c["WARPS"]) for c in triton_nvfp4.WIDE_CONFIGS.values()]  # the defaults


def compile_wide(rn, vw, tn, warps, parts=1, split=1, even_k=True, s_pairs=False, arch=90):
    """The wide-load GEMV (a Gluon kernel) for bf16 x, specialised as at run time; None where this Triton has
    no Gluon."""
    try:
        import triton.experimental.gluon._runtime  # noqa: F401 - Gluon is there

        from qwenlab.quant import wide_nvfp4
    except ImportError:
        return None
    jit = wide_nvfp4.wide_gemv_kernel
    block_n, bw = triton_nvfp4.wide_tile({"RN": rn, "VW": vw, "TN": tn, "WARPS": warps})
    values = dict(PARTS=parts, SPLIT=split, EVEN_K=even_k, BLOCK_N=block_n, BW=bw,
                  L3=wide_nvfp4.layout(rn, vw, tn, warps), READ_ONLY=0, PREFETCH=False, FINISH=split > 1,
                  S_PAIRS=s_pairs)
    pointers = {**{n: t for n, t in POINTERS.items() if n != "B"}, "X": "*bf16", "COUNTERS": "*i32"}
    if s_pairs:
        pointers.update(S0="*i16", S1="*i16", S2="*i16")
    return compile_gluon(jit, values, pointers, warps, arch)


# the pointer arguments of the fused layer's GEMVs, for bf16 x
LAYER_POINTERS = {**{n: t for n, t in POINTERS.items() if n != "B"}, "X": "*bf16", "G": "*bf16", "R": "*bf16",
                  "COUNTERS": "*i32"}
# The fused NVFP4 layer's four GEMVs on the Qwen3-4B shape: (label, PARTS, SPLIT, EVEN_K, PRO, GLU, RES)
LAYER_GEMVS = [("q/k/v + norm", 3, 1, True, True, False, False), ("o + residual", 1, 4, True, False, False, True),
               ("gate/up + norm, silu", 2, 1, True, True, True, False), ("down + residual", 1, 4, False, False, False,
                                                                          True)]


def compile_layer(parts, split, even_k, pro, glu, res, pdl=3, arch=90):
    """A GEMV of the fused NVFP4 layer (wide_nvfp4.layer_gemv_kernel) with the tile triton_nvfp4.layer_gemv
    takes, for bf16 x; None where this Triton has no Gluon."""
    try:
        import triton.experimental.gluon._runtime  # noqa: F401 - Gluon is there

        from qwenlab.quant import wide_nvfp4
    except ImportError:
        return None, None
    config = triton_nvfp4.layer_config(glu, pro)
    jit = wide_nvfp4.layer_gemv_kernel
    block_n, bw = triton_nvfp4.wide_tile(config)
    values = dict(PARTS=parts, SPLIT=split, EVEN_K=even_k, BLOCK_N=block_n, BW=bw,
                  L3=wide_nvfp4.layout(config["RN"], config["VW"], config["TN"], config["WARPS"]), FINISH=split > 1,
                  S_PAIRS=config["S_PAIRS"], PRO=pro, GLU=glu, RES=res, PDL=pdl)
    pointers = dict(LAYER_POINTERS)
    if config["S_PAIRS"]:
        pointers.update(S0="*i16", S1="*i16", S2="*i16")
    words = config["RN"] * config["VW"] * (2 if glu else 1)
    return compile_gluon(jit, values, pointers, config["WARPS"], arch), words


def compile_pair(parts, split, pro, glu, res, steps=8, vw=4, kw=4, pdl=3, arch=90, once=False, ksteps=8,
                 probe=False):
    """A GEMV of the fused NVFP4 layer on tensor cores (pair_nvfp4.pair_gemv_kernel) for bf16 x, `steps` steps
    of K a program (its shared memory for x; once: x staged in one pass, `ksteps` the steps over all of K; probe:
    with the timing probe of bench/nvfp4_probe.py); None where this Triton has no Gluon."""
    try:
        import triton.experimental.gluon._runtime  # noqa: F401 - Gluon is there

        from qwenlab.quant import pair_nvfp4
    except ImportError:
        return None, None
    jit = pair_nvfp4.pair_gemv_kernel
    values = dict(PARTS=parts, SPLIT=split, STEPS=steps, VW=vw, KW=kw, L=pair_nvfp4.layout(vw, kw),
                  SL=pair_nvfp4.stage_layout(vw, kw), SCL=pair_nvfp4.scale_layout(vw, kw), FINISH=split > 1, PRO=pro,
                  GLU=glu, RES=res, PDL=pdl, LITE=0, ONCE=once, KSTEPS=ksteps, SL4=pair_nvfp4.once_layout(vw, kw),
                  **({} if probe else {"PROBES": None}))
    words = vw * 2 * (2 if glu else 1)  # rows g and g + 8 (and up's)
    return compile_gluon(jit, values, {**LAYER_POINTERS, **({"PROBES": "*i64"} if probe else {})}, kw, arch), words


def registers(cubin: bytes, path: str) -> int:
    """The registers a thread of the cubin's kernel holds (cuobjdump -res-usage)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with open(path, "wb") as f:
        f.write(cubin)
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def sass_text(cubin: bytes, path: str) -> str:
    """The SASS of a cubin (written to path for cuobjdump, which Triton's wheel bundles)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with open(path, "wb") as f:
        f.write(cubin)
    return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout


def loop_instructions(cubin: bytes, path: str) -> list[str]:
    """The opcodes of the longest loop (between a backward branch and its target): the loop along K."""
    sass = sass_text(cubin, path)
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = [[]]
    for address, op, args in code:
        target = re.search(r"0x([0-9a-f]+)", args)
        if op.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append([o for a, o, _ in code if int(target.group(1), 16) <= a <= address])
    return max(loops, key=len)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--out-dir", default="/tmp", help="where the cubins are written for cuobjdump")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}; per word: loop instructions / int32 words per thread")
    print(f"{'tile':<22} {'shared B':>8} {'converts':>8} {'loop':>5} {'per word':>8}  LDG LDS STS BAR SHFL HMMA")
    rows = [(f"{n}x{g} w{w}{' x_vec' if v else ''}{' flat' if f else ''}", compile_tile(n, g, w, v, f, args.arch),
             n * g * 2 / (32 * w)) for n, g, w, v, f in TILES]
    rows += [(f"mma {n}x{k} w{w}", compile_mma(n, k, w, arch=args.arch), n * k / 8 / (32 * w)) for n, k, w in MMA_TILES]
    rows += [(f"wide {rn}x{vw} tn{tn} w{w}", compile_wide(rn, vw, tn, w, arch=args.arch), rn * vw)
             for rn, vw, tn, w in WIDE_TILES]
    for label, parts, split, even_k, pro, glu, res in LAYER_GEMVS:
        kernel, words = compile_layer(parts, split, even_k, pro, glu, res, arch=args.arch)
        rows.append((f"layer {label}", kernel, words))
    for label, parts, split, _, pro, glu, res in LAYER_GEMVS:
        kernel, words = compile_pair(parts, split, pro, glu, res, arch=args.arch)
        rows.append((f"pair {label}", kernel, words))
    for label, kernel, words in rows:
        if kernel is None:
            print(f"{label:<22} (no Gluon in this Triton)")
            continue
        body = loop_instructions(kernel.asm["cubin"], os.path.join(args.out_dir, "nvfp4_gemv.cubin"))
        count = collections.Counter(op.split(".")[0] for op in body)
        print(f"{label:<22} {kernel.metadata.shared:>8} {kernel.asm['ttgir'].count('convert_layout'):>8} "
              f"{len(body):>5} {len(body) / words:>8.1f}  {count['LDG']:>3} {count['LDS']:>3} {count['STS']:>3} "
              f"{count['BAR']:>3} {count['SHFL']:>4} {count['HMMA']:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
