"""Random NVFP4 weights for the GEMV tests on CUDA."""
import torch

from qwenlab.quant import codec


def weights_with_subnormal_scales(ns, k: int, gen: torch.Generator) -> list[codec.NVFP4Weight]:
    """One quantized weight [n, k] per n of ns (part i scaled by 0.02 (i + 1)), the first eighth of each one's rows
    given E4M3 subnormal block scales (codes 1-7), which a decode that flushes subnormals would zero."""
    parts = []
    for i, n in enumerate(ns):
        q = codec.quantize(torch.randn(n, k, device="cuda", generator=gen) * (0.02 * (i + 1)))
        tiny = q.block_scale[: max(n // 8, 1)].view(torch.uint8)
        tiny.copy_(torch.randint(1, 8, tiny.shape, device="cuda", generator=gen, dtype=torch.uint8))
        parts.append(q)
    return parts
