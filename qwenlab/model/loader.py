"""Checkpoint directory (HF layout) -> validated Qwen3 + tokenizer, built once and not changed afterwards.
Safetensors only. The module tree (NVFP4 linears, fused projections, attention, per-layer devices) is decided
before construction; each tensor is read straight to the device of the layer that owns it."""
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from qwenlab.errors import QwenlabError
from qwenlab.model import nvfp4_load
from qwenlab.model.config import Qwen3Config, read_config, read_generation_config
from qwenlab.model.dtypes import parse_dtype, resolve_dtype  # noqa: F401  (re-exported)
from qwenlab.model.files import check_checkpoint, tensor_shapes, weight_files
from qwenlab.model.hf_names import fused_experts_hint, fused_state, hf_shapes
from qwenlab.model.placement import device_of, parse_device_map
from qwenlab.model.qwen3 import Qwen3
from qwenlab.model.spec import LoadSpec
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.model.tokenizer import Tokenizer


def resolve_device(name: str | None) -> torch.device:
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QwenlabError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise QwenlabError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1)") from None


def validate(checkpoint_dir: Path, cfg: Qwen3Config, quant: str | None = None, exclude=None,
             allow_unknown: bool = False) -> tuple[dict[str, Path], nvfp4_load.QuantSelection]:
    """-> (tensor name -> file, which linears are NVFP4), every expected tensor checked before any compute, and
    the folder's files (qwenlab.model.files): read only inside it, one weight source, no tensor the config does not
    explain (unless allow_unknown), every weight and scale finite."""
    files = weight_files(checkpoint_dir)
    shapes = tensor_shapes(files)
    selection = nvfp4_load.select(checkpoint_dir, cfg, shapes, files, quant, exclude)
    stored = {f"{m}.weight" for m in selection.stored}
    for name, shape in hf_shapes(cfg).items():
        if name in stored:
            continue
        if name not in shapes:
            raise QwenlabError(f"{checkpoint_dir}: tensor {name} is missing from the checkpoint"
                               f"{fused_experts_hint(name, shapes)}")
        if shapes[name] != shape:
            raise QwenlabError(f"{checkpoint_dir}: tensor {name} has shape {list(shapes[name])}, "
                               f"config.json implies {list(shape)}")
    check_checkpoint(checkpoint_dir, files, set(hf_shapes(cfg)) | selection.file_names, cfg, allow_unknown)
    return files, selection


@dataclass
class Checkpoint:
    path: Path
    config: Qwen3Config
    generation_config: dict
    model: Qwen3
    tokenizer: "object"
    spec: LoadSpec = LoadSpec()

    @property
    def name(self) -> str:
        return self.path.name


def as_spec(spec, dtype: str | None = None, device: str | None = None, quant: str | None = None,
            **fields) -> LoadSpec:
    """A LoadSpec as given, or one built from a checkpoint path and the loader's keyword arguments."""
    if isinstance(spec, LoadSpec):
        if dtype is not None or device is not None or quant is not None or fields:
            raise TypeError("load(LoadSpec, ...): put every option in the LoadSpec")
        return spec
    return LoadSpec(model=spec, dtype=dtype, device=device, quant=quant, **fields)


def load_model(spec, dtype: str | None = None, device: str | None = None, quant: str | None = None,
               **fields) -> Qwen3:
    """A LoadSpec (or a path and its fields) -> the model, on its device(s), in eval mode."""
    spec = as_spec(spec, dtype, device, quant, **fields)
    checkpoint_dir = resolve_model_dir(spec.model)
    if not checkpoint_dir.is_dir():
        raise QwenlabError(f"--model {checkpoint_dir}: not a directory")
    cfg = read_config(checkpoint_dir)
    files, selection = validate(checkpoint_dir, cfg, spec.quant, spec.exclude, spec.allow_unknown)
    layer_devices = parse_device_map(spec.device_map, cfg.num_hidden_layers) if spec.device_map else None
    first = torch.device(layer_devices[0]) if layer_devices else resolve_device(spec.device)
    torch_dtype = resolve_dtype(spec.dtype, first, cfg)
    info = nvfp4_load.quant_info(selection, cfg, first)
    fused = (first.type == "cuda" and info is None) if spec.fused is None else spec.fused and info is None
    with torch.device("meta"):
        model = Qwen3(cfg, attention=spec.attention, fused=fused, quantization=info, layer_devices=layer_devices)

    def place(name: str) -> torch.device:
        return device_of(name, layer_devices, cfg.tie_word_embeddings) if layer_devices else first

    handles = {}

    def get(name):
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handles[path].get_tensor(name)

    try:
        state = nvfp4_load.quantized_state(selection, get, first, torch_dtype, cfg.tie_word_embeddings)
        state = {name: t.to(place(name)) for name, t in state.items()}
        replaced = selection.replaced_weights if info is not None else set()
        for name in hf_shapes(cfg):
            if name not in replaced and name not in state:
                state[name] = get(name).to(device=place(name), dtype=torch_dtype)
    finally:
        handles.clear()
    if cfg.tie_word_embeddings and "lm_head.weight" not in replaced:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(fused_state(state, model), strict=True, assign=True)
    if cfg.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True made two Parameters of one tensor
    model.model.rotary.to(place("model.embed_tokens.weight"))
    return model.requires_grad_(False).eval()


def load(spec, dtype: str | None = None, device: str | None = None, quant: str | None = None,
         **fields) -> Checkpoint:
    """load(LoadSpec(...)) or load(path, dtype, device, quant, exclude=, device_map=, attention=, fused=)."""
    spec = as_spec(spec, dtype, device, quant, **fields)
    model = load_model(spec)
    checkpoint_dir = resolve_model_dir(spec.model)
    gen = read_generation_config(checkpoint_dir)
    tok = Tokenizer.from_dir(checkpoint_dir, generation_config=gen, model_vocab_size=model.config.vocab_size)
    return Checkpoint(checkpoint_dir, model.config, gen, model, tok, spec)
