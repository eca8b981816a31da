"""Run dtypes: their names on the command line and in dumps, and what `auto` means."""
import torch

from qwenlab.errors import QwenlabError
from qwenlab.model.config import Qwen3Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (a string is returned as it is)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QwenlabError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(name: str | None, device: torch.device, config: Qwen3Config) -> torch.dtype:
    """'auto' = float32 on CPU (exact and fast enough there), the checkpoint's dtype on an accelerator."""
    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else DTYPES.get(config.torch_dtype, torch.bfloat16)
    return parse_dtype(name)
