"""Checkpoint directory (HF layout) -> validated, lazily loaded Qwen3 + tokenizer. Safetensors only."""
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from qwenlab.errors import QwenlabError
from qwenlab.model import nvfp4_load
from qwenlab.model.config import Qwen3Config, read_config, read_generation_config
from qwenlab.model.files import check_checkpoint, tensor_shapes, weight_files
from qwenlab.model.placement import parse_device_map, place
from qwenlab.model.qwen3 import Qwen3
from qwenlab.model.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QwenlabError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QwenlabError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise QwenlabError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1)") from None


def resolve_dtype(name: str | None, device: torch.device, config: Qwen3Config) -> torch.dtype:
    """'auto' = float32 on CPU (exact and fast enough there), the checkpoint's dtype on an accelerator."""
    if name in (None, "auto"):
        return torch.float32 if device.type == "cpu" else DTYPES.get(config.torch_dtype, torch.bfloat16)
    return parse_dtype(name)


def expected_shapes(cfg: Qwen3Config) -> dict[str, tuple]:
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (cfg.q_size, H),
            p + "self_attn.k_proj.weight": (cfg.kv_size, H),
            p + "self_attn.v_proj.weight": (cfg.kv_size, H),
            p + "self_attn.o_proj.weight": (H, cfg.q_size),
            p + "self_attn.q_norm.weight": (cfg.head_dim,),
            p + "self_attn.k_norm.weight": (cfg.head_dim,),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        }
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (cfg.q_size,), p + "self_attn.k_proj.bias": (cfg.kv_size,),
                       p + "self_attn.v_proj.bias": (cfg.kv_size,), p + "self_attn.o_proj.bias": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def validate(checkpoint_dir: Path, cfg: Qwen3Config, quant: str | None = None, exclude=None,
             allow_unknown: bool = False) -> tuple[dict[str, Path], "nvfp4_load.QuantPlan"]:
    """-> (tensor name -> file, which linears are NVFP4), every expected tensor checked before any compute."""
    files = weight_files(checkpoint_dir)
    shapes = tensor_shapes(files)
    plan = nvfp4_load.plan(checkpoint_dir, cfg, shapes, files, quant, exclude)
    stored = {f"{m}.weight" for m in plan.stored}
    for name, shape in expected_shapes(cfg).items():
        if name in stored:
            continue
        if name not in shapes:
            raise QwenlabError(f"{checkpoint_dir}: tensor {name} is missing from the checkpoint")
        if shapes[name] != shape:
            raise QwenlabError(f"{checkpoint_dir}: tensor {name} has shape {list(shapes[name])}, "
                               f"config.json implies {list(shape)}")
    check_checkpoint(checkpoint_dir, files, set(expected_shapes(cfg)) | plan.file_names, cfg, allow_unknown)
    return files, plan


@dataclass
class Checkpoint:
    path: Path
    config: Qwen3Config
    generation_config: dict
    model: Qwen3
    tokenizer: "object"

    @property
    def name(self) -> str:
        return self.path.name


def load_model(checkpoint_dir, dtype: str | None = None, device: str | None = None, quant: str | None = None,
               exclude=None, device_map=None, allow_unknown: bool = False) -> Qwen3:
    """quant / exclude: NVFP4 (qwenlab.model.nvfp4_load); the result's `quantization` says what was done.
    device_map (a spec or one device per layer, qwenlab.model.placement) splits the layers across devices: the
    weights are staged in host memory, then each part moves to its device; `device` is then unused.
    allow_unknown: tensors config.json does not explain (unknown names, layers beyond num_hidden_layers) are left
    unread instead of refused."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise QwenlabError(f"--model {checkpoint_dir}: not a directory")
    cfg = read_config(checkpoint_dir)
    files, plan = validate(checkpoint_dir, cfg, quant, exclude, allow_unknown)
    split = parse_device_map(device_map, cfg.num_hidden_layers) if device_map else None
    dev = torch.device("cpu") if split else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch.device(split[0]) if split else dev, cfg)
    with torch.device("meta"):
        model = Qwen3(cfg)
    handles = {}

    def get(name):
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handles[path].get_tensor(name)

    state = {}
    try:
        info = nvfp4_load.build(model, plan, get, dev, torch_dtype, state)
        for name in expected_shapes(cfg):
            if name not in plan.replaced_weights:
                state[name] = get(name).to(device=dev, dtype=torch_dtype)
    finally:
        handles.clear()
    if cfg.tie_word_embeddings and "lm_head.weight" not in plan.replaced_weights:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if info is not None:
        model.quantization = info
    if split:
        place(model, split)
    return model.eval()


def load(checkpoint_dir, dtype: str | None = None, device: str | None = None, quant: str | None = None,
         exclude=None, device_map=None, allow_unknown: bool = False) -> Checkpoint:
    checkpoint_dir = Path(checkpoint_dir)
    model = load_model(checkpoint_dir, dtype, device, quant, exclude, device_map, allow_unknown)
    gen = read_generation_config(checkpoint_dir)
    tok = Tokenizer.from_dir(checkpoint_dir, generation_config=gen, model_vocab_size=model.config.vocab_size)
    return Checkpoint(checkpoint_dir, model.config, gen, model, tok)
