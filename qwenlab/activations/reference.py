"""The trusted side: HF transformers' Qwen3ForCausalLM (eager attention) with hooks for the canonical names.

transformers is imported lazily here and nowhere on the qwenlab forward path.
"""
import inspect
import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from qwenlab.errors import QwenlabError
from qwenlab.model.probe import Probe
from qwenlab.versions import package_versions as versions  # noqa: F401  (re-exported)


def quiet_optional_imports():
    """transformers imports torchao when it is installed, which logs a line per prebuilt extension it cannot load
    on this machine and torch warns about its pytree registrations: noise in every report, not a problem."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_reference(checkpoint_dir, dtype: torch.dtype = torch.float32, device="cpu", attention: str = "eager",
                   direct_to_device: bool = False, device_map=None, max_memory: dict | None = None):
    """Qwen3ForCausalLM from the checkpoint, eager attention by default (the trusted side of every diff).
    direct_to_device loads the weights straight onto `device`, transformers' fastest load. device_map ("auto",
    "balanced" or accelerate's dict) with max_memory ({gpu index: bytes}) splits it across GPUs through accelerate,
    the maintained engine for that in the transformers ecosystem."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_optional_imports()
    from transformers import Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    try:
        if device_map is not None:
            placement = {"device_map": device_map, **({"max_memory": max_memory} if max_memory else {})}
        elif direct_to_device and torch.device(device).type != "cpu":
            placement = {"device_map": str(device)}
        else:
            placement = {}
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": as intended
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = Qwen3ForCausalLM.from_pretrained(str(checkpoint_dir), dtype=dtype, attn_implementation=attention,
                                                     local_files_only=True, **placement,
                                                     **_quantized_kwargs(checkpoint_dir))
    except (OSError, ValueError, ImportError) as e:
        raise QwenlabError(f"{checkpoint_dir}: transformers could not load it ({str(e).splitlines()[0]})") from None
    return (model if placement else model.to(device)).eval()


def _quantized_kwargs(checkpoint_dir) -> dict:
    """A compressed-tensors checkpoint (NVFP4 among others) is decompressed at load (dequantize=True: dense weights,
    computed through bfloat16 by compressed-tensors); the compressed-tensors package must be installed."""
    config = Path(checkpoint_dir) / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if not quant or quant.get("quant_method") != "compressed-tensors":
        return {}
    from transformers import CompressedTensorsConfig

    new_api = "dequantize" in inspect.signature(CompressedTensorsConfig.__init__).parameters  # transformers >= 5.2x
    config = CompressedTensorsConfig(dequantize=True) if new_api else CompressedTensorsConfig(run_compressed=False)
    return {"quantization_config": config}


@contextmanager
def _rope_tap(probe: Probe, current_layer: list):
    """The reference applies RoPE in a module-level function, not a module: wrap that function for the capture."""
    from transformers.models.qwen3 import modeling_qwen3 as mq

    original = mq.apply_rotary_pos_emb

    def tapped(q, k, cos, sin, *args, **kwargs):
        q_out, k_out = original(q, k, cos, sin, *args, **kwargs)
        p = f"layers.{current_layer[0]}.attn."
        probe.record(p + "q_rope", q_out.transpose(1, 2))
        probe.record(p + "k_rope", k_out.transpose(1, 2))
        return q_out, k_out

    mq.apply_rotary_pos_emb = tapped
    try:
        yield
    finally:
        mq.apply_rotary_pos_emb = original


def _hooks(model, probe: Probe, current_layer: list):
    def out_hook(name):
        return lambda mod, args, out: probe.record(name, out[0] if isinstance(out, tuple) else out)

    def in_hook(name):
        return lambda mod, args: probe.record(name, args[0])

    def enter_layer(i):
        def hook(mod, args):
            current_layer[0] = i
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(out_hook("embed"))]
    for i, layer in enumerate(model.model.layers):
        p, attn, mlp = f"layers.{i}.", layer.self_attn, layer.mlp
        pairs = [
            (layer.input_layernorm, out_hook(p + "input_layernorm")),
            (attn.q_proj, out_hook(p + "attn.q_proj")), (attn.k_proj, out_hook(p + "attn.k_proj")),
            (attn.v_proj, out_hook(p + "attn.v_proj")), (attn.q_norm, out_hook(p + "attn.q_norm")),
            (attn.k_norm, out_hook(p + "attn.k_norm")), (attn.o_proj, out_hook(p + "attn.o_proj")),
            (layer.post_attention_layernorm, out_hook(p + "post_attention_layernorm")),
            (mlp.gate_proj, out_hook(p + "mlp.gate_proj")), (mlp.up_proj, out_hook(p + "mlp.up_proj")),
            (mlp.act_fn, out_hook(p + "mlp.act")), (mlp.down_proj, out_hook(p + "mlp.down_proj")),
            (layer, out_hook(p + "output")),
        ]
        handles += [m.register_forward_hook(h) for m, h in pairs]
        handles += [
            layer.register_forward_pre_hook(in_hook(p + "input")),
            attn.register_forward_pre_hook(enter_layer(i)),
            attn.o_proj.register_forward_pre_hook(in_hook(p + "attn.context")),
            layer.post_attention_layernorm.register_forward_pre_hook(in_hook(p + "post_attention_residual")),
        ]
    handles.append(model.model.norm.register_forward_hook(out_hook("norm")))
    return handles


@torch.inference_mode()
def capture_reference(model, ids: list[int], probe: Probe | None = None) -> dict[str, torch.Tensor]:
    probe = probe or Probe()
    if len({id(layer.mlp.act_fn) for layer in model.model.layers}) != len(model.model.layers):
        raise QwenlabError("reference: layers share one activation module, per-layer mlp.act hooks would collide")
    current_layer = [0]
    handles = _hooks(model, probe, current_layer)
    try:
        with _rope_tap(probe, current_layer):
            input_ids = torch.tensor([ids], device=model.device)
            logits = model(input_ids=input_ids, use_cache=False).logits
        probe.record("logits", logits)
    finally:
        for h in handles:
            h.remove()
    return probe.tensors


def reference_generate(model, ids: list[int], max_new_tokens: int, stop_ids=(), **generate_kwargs) -> list[int]:
    """HF greedy generate; returns generated ids only (stop token included when it ended generation).
    generate_kwargs go to transformers' generate (e.g. cache_implementation="static", min_new_tokens)."""
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None,
                         pad_token_id=(list(stop_ids) or [0])[0], temperature=None, top_p=None, top_k=None,
                         **generate_kwargs)
    return out[0, len(ids):].tolist()


def reference_name() -> str:
    return "transformers.Qwen3ForCausalLM(eager)"


