"""LoadSpec: how to load a model, as one frozen value built once (from a command's arguments or a notebook's
parameters) and passed down. One argparse group defines its flags for every command, so `--dtype` means the same
everywhere: float32 | bfloat16 | float16 | auto (float32 on a CPU, the checkpoint's dtype on an accelerator)."""
import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from qwenlab.errors import QwenlabError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANT_CHOICES = ("none", "nvfp4", "nvfp4-w4a4")
ATTENTION_CHOICES = ("sdpa", "eager")


@dataclass(frozen=True)
class LoadSpec:
    model: Path | None = None  # checkpoint directory (HF layout); None: the embedded tiny fixture
    dtype: str = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    quant: str | None = None  # None: as the checkpoint is; none | nvfp4 | nvfp4-w4a4 (doc/nvfp4.md)
    exclude: tuple[str, ...] | None = None  # linears kept in high precision when quantizing at load
    device_map: str | tuple[str, ...] | None = None  # qwenlab's layers across devices (doc/placement.md)
    attention: str = "sdpa"
    fused: bool | None = None  # q/k/v and gate/up as one matmul each; None: on CUDA for a dense model
    allow_unknown: bool = False  # tensors config.json does not explain are left unread instead of refused

    def __post_init__(self):
        for name in ("model", "device", "quant", "device_map"):  # an empty string (a notebook parameter) = default
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        if not self.dtype:
            object.__setattr__(self, "dtype", "auto")
        if self.dtype not in DTYPE_CHOICES:
            raise QwenlabError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        if self.quant not in (None, *QUANT_CHOICES):
            raise QwenlabError(f"--quant {self.quant!r}: choose one of {', '.join(QUANT_CHOICES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise QwenlabError(f"attention {self.attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
        if self.model is not None and not isinstance(self.model, Path):
            object.__setattr__(self, "model", Path(self.model).expanduser())
        if isinstance(self.exclude, list):
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.device_map, list):
            object.__setattr__(self, "device_map", tuple(self.device_map))

    @classmethod
    def from_params(cls, model_dir: str = "", dtype: str = "auto", device: str = "", quant: str = "",
                    device_map: str = "", **fields) -> "LoadSpec":
        """From a notebook's standard parameters, where an empty string means the default."""
        return cls(model=model_dir, dtype=dtype, device=device, quant=quant, device_map=device_map, **fields)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fields) -> "LoadSpec":
        return cls(model=args.model, dtype=args.dtype, device=args.device, quant=args.quant,
                   device_map=args.device_map, allow_unknown=args.allow_unknown_tensors, **fields)

    def with_(self, **changes) -> "LoadSpec":
        return replace(self, **changes)


def add_load_arguments(p: argparse.ArgumentParser, *, quant: bool = True, device_map: bool = True):
    """The flags every command that loads a model shares."""
    p.add_argument("--model", type=Path, default=None,
                   help="Qwen3 checkpoint directory in HF layout (default: the embedded tiny fixture)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto (default): float32 on a CPU, the checkpoint's dtype on an accelerator")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    if quant:
        p.add_argument("--quant", choices=QUANT_CHOICES, default=None,
                       help="default: as the checkpoint is; nvfp4 quantizes a bf16/fp32 checkpoint's linears at "
                            "load (doc/nvfp4.md)")
    else:
        p.set_defaults(quant=None)
    if device_map:
        p.add_argument("--device-map", default=None,
                       help="qwenlab's layers split across devices: balanced | 0:0-31,1:32-63 (doc/placement.md)")
    else:
        p.set_defaults(device_map=None)
    p.add_argument("--allow-unknown-tensors", action="store_true",
                   help="load a checkpoint holding tensors config.json does not explain, leaving them unread")
