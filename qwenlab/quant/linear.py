"""NVFP4Linear: what the loader puts where an nn.Linear was (same attribute name, so module names and probe points
stay), holding the packed weight. How it multiplies (`kernel`):

    dequantize   W4A16: the weight is dequantized to the activation dtype at every call, then a torch matmul (CPU;
                 what transformers' compressed-tensors path computes)
    triton       W4A16 on CUDA (Hopper has no FP4 tensor cores): one row (decode) through a Triton GEMV that reads the
                 packed codes and scales once and dequantizes in registers; more rows (prefill) dequantize the weight
                 with a Triton kernel into a transient buffer (bit-identical to `dequantize`), then cuBLAS
                 (qwenlab.quant.triton_nvfp4)
    emulate-w4a4 W4A4 emulated: the activations are also quantized to NVFP4 per 16-block with the input scale
                 (the checkpoint's, else the activation's own amax) and dequantized, then as above
    scaled_mm    W4A4 on Blackwell: torch._scaled_mm on float4_e2m1fn_x2 operands (chosen only after it matched
                 the emulation on this device, see use_native_fp4)
"""
import importlib.util
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qwenlab.quant import codec, fp4_gemm

ACTIVATIONS = ("w4a16", "w4a4")
KERNEL_TEXT = {
    "dequantize": "dequantize: weights dequantized per call, torch matmul, no FP4 GEMM",
    "triton": "triton: W4A16 GEMV reading the packed weights for one row, Triton dequantize + cuBLAS for more",
    "emulate-w4a4": "emulate-w4a4: weights and activations quantized to NVFP4 and dequantized, torch matmul",
    "scaled_mm": "scaled_mm: native FP4 GEMM, torch._scaled_mm on float4_e2m1fn_x2, Blackwell",
}


class NVFP4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, has_input_scale: bool = False,
                 device=None, activations: str = "w4a16", kernel: str = "dequantize"):
        super().__init__()
        codec.check_shape((out_features, in_features), "NVFP4Linear")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("block_scale", torch.empty(out_features, in_features // codec.BLOCK,
                                                        dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("tensor_scale", torch.empty((), dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.empty((), dtype=torch.float32, device=device)
                             if has_input_scale else None)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        if activations not in ACTIVATIONS or kernel not in KERNEL_TEXT:
            raise ValueError(f"activations {activations!r} / kernel {kernel!r}: choose from {ACTIVATIONS} / "
                             f"{tuple(KERNEL_TEXT)}")
        self.activations, self.kernel = activations, kernel

    @classmethod
    def from_weight(cls, weight: codec.NVFP4Weight, bias: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None, **kwargs) -> "NVFP4Linear":
        N, K = weight.shape
        module = cls(K, N, bias is not None, input_scale is not None, device="meta", **kwargs)
        module.load_state_dict(module_state(weight, bias, input_scale), strict=True, assign=True)
        return module

    def nvfp4(self) -> codec.NVFP4Weight:
        return codec.NVFP4Weight(self.packed, self.block_scale, self.tensor_scale)

    def dequantize_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return codec.dequantize(self.nvfp4(), dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32, computed on access: nothing dense is stored)."""
        return self.dequantize_weight(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "scaled_mm":
            return fp4_gemm.linear(x, self.nvfp4(), self.input_scale, self.bias)
        if self.kernel == "triton":
            from qwenlab.quant import triton_nvfp4  # Triton: only where CUDA is (the loader chose this kernel)

            if x.numel() == self.in_features:
                return triton_nvfp4.nvfp4_gemv(x, self.packed, self.block_scale, self.tensor_scale, self.bias)
            return F.linear(x, transient_weight((self,), x.dtype), self.bias)
        if self.activations == "w4a4":
            x = codec.fake_quantize(x, self.input_scale)
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.activations}, kernel={self.kernel}")


def multiply_parts(linears: tuple, x: torch.Tensor) -> tuple:
    """(linear(x) for each of linears, all on the same x): q/k/v or gate/up of a model whose projections are not
    fused. W4A16 NVFP4 Triton linears (no bias, no module hook) with more than one row of x (a prefill) dequantize
    into one transient weight in one launch and multiply it in one matmul: per layer three kernel launches and
    three matmuls fewer to issue, which is what bounds an NVFP4 prefill on a host that issues them slower than the
    GPU runs them. Each weight's values are those of dequantize_into; the matmul covers all their rows at once."""
    if (len(linears) > 1 and x.numel() > x.shape[-1]
            and all(plain_w4a16(m) and m.in_features == x.shape[-1] for m in linears)):
        return F.linear(x, transient_weight(linears, x.dtype)).split([m.out_features for m in linears], dim=-1)
    return tuple(linear(x) for linear in linears)


def transient_weight(linears: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The weights of 1-3 Triton-kernel NVFP4Linears of the same K, dequantized in one launch into one new buffer
    in `dtype`, their rows one after the other (a prefill's weight: freed after its matmul, its memory recycled by
    torch's caching allocator)."""
    from qwenlab.quant import triton_nvfp4  # Triton: only where CUDA is (the loader chose this kernel)

    packed = linears[0].packed
    weight = torch.empty(sum(m.out_features for m in linears), linears[0].in_features, dtype=dtype,
                         device=packed.device)
    return triton_nvfp4.dequantize_parts_into(weight, [(m.packed, m.block_scale, m.tensor_scale) for m in linears])


def plain_w4a16(module: nn.Module) -> bool:
    """An NVFP4Linear whose call is exactly the W4A16 Triton kernels (no bias, no module hook of its own or global
    that would change it), so that it may be multiplied together with others."""
    return (type(module) is NVFP4Linear and module.kernel == "triton" and module.activations == "w4a16"
            and module.bias is None and not module._forward_hooks and not module._forward_pre_hooks
            and not global_hooks())


def global_hooks() -> bool:
    """A forward (pre-)hook installed for every module (torch.nn.modules.module.register_module_forward_hook):
    whatever runs a module's computation without calling the module would skip it."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def module_state(weight: codec.NVFP4Weight, bias: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """An NVFP4Linear's state dict (its buffer names) for a quantized weight."""
    state = {"packed": weight.packed, "block_scale": weight.block_scale, "tensor_scale": weight.tensor_scale}
    if input_scale is not None:
        state["input_scale"] = input_scale.to(torch.float32).reshape(())
    if bias is not None:
        state["bias"] = bias
    return state


def nvfp4_modules(model: nn.Module) -> dict[str, NVFP4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NVFP4Linear)}


def choose_kernel(activations: str, device) -> str:
    """The kernel NVFP4Linear runs for `activations` on `device`: W4A16 through Triton on CUDA (where Triton is
    installed), scaled_mm for W4A4 only where FP4 tensor cores exist and agree with the emulation (a wrong scale
    layout is never silently used), else the torch dequantize path."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
    if activations == "w4a16":
        cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return "triton" if cuda and importlib.util.find_spec("triton") is not None else "dequantize"
    return "scaled_mm" if native_fp4_matches(torch.device(device)) else "emulate-w4a4"


@torch.no_grad()
def native_fp4_matches(device: torch.device, tolerance: float = 1e-2) -> bool:
    """True on a device with FP4 tensor cores where scaled_mm's output matches the emulated W4A4 on random data."""
    if not fp4_gemm.available(device):
        return False
    gen = torch.Generator(device).manual_seed(0)
    module = NVFP4Linear.from_weight(codec.quantize(torch.randn(256, 256, device=device, generator=gen)))
    x = torch.randn(32, module.in_features, device=device, dtype=torch.bfloat16, generator=gen)
    try:
        native = fp4_gemm.linear(x, module.nvfp4(), module.input_scale).float()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    emulated = F.linear(codec.fake_quantize(x, module.input_scale), module.dequantize_weight(x.dtype)).float()
    return bool((native - emulated).norm() <= tolerance * emulated.norm())


@dataclass
class QuantInfo:
    """What the loader chose, given to the model's constructor (`model.quantization`; None on a dense model)."""
    method: str
    source: str  # "checkpoint" or "quantized at load"
    layout: str | None  # the checkpoint's layout (None when quantized at load)
    exclude: list[str]
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # linears left in high precision
    input_scales: list[str] = field(default_factory=list)  # quantized linears that carry an input scale
    unquantizable: list[str] = field(default_factory=list)  # kept: K is not a multiple of 16
    activations: str = "w4a16"
    kernel: str = "dequantize"

    def summary(self) -> str:
        where = f"checkpoint, {self.layout} layout" if self.source == "checkpoint" else self.source
        kept = ", ".join(self.kept) if len(self.kept) <= 4 else f"{len(self.kept)} linears"
        why = (f" ({len(self.unquantizable)} of them because K is not a multiple of {codec.BLOCK})"
               if self.unquantizable else "")
        return (f"{self.method}, {where}: {len(self.quantized)} linears quantized; kept in high precision: "
                f"{kept or 'none'}{why}; {self.activations.upper()}; kernel {KERNEL_TEXT[self.kernel]}")

    def to_json(self) -> dict:
        return asdict(self)
