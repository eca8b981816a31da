"""The trusted side: HF transformers' Qwen3ForCausalLM or Qwen3MoeForCausalLM (eager attention, eager experts), its
canonical activations captured by forward hooks on its modules. Which module holds each name comes from qwenlab's
own hook points (their `reference` field), so the two sides share one list of names. Nothing of transformers' model
is patched (its loader's allocator warm-up is skipped during a load: see load_reference).

transformers is imported lazily here (it is slow to import) and nowhere on the qwenlab forward path.
"""
import contextlib
import functools
import inspect
import json
import logging
import os
import warnings
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from qwenlab.activations.routing import forced_weights, with_experts
from qwenlab.errors import QwenlabError
from qwenlab.model.config import Qwen3Config, config_from_dict, read_config
from qwenlab.model.hf_names import meta_model
from qwenlab.model.hooks import Recorder, Reference, reference_paths
from qwenlab.versions import package_versions


def reference_name(config: Qwen3Config) -> str:
    """The producer a reference dump names: transformers' class for this architecture, eager."""
    return f"transformers.{config.architecture}(eager)"


def quiet_optional_imports():
    """transformers imports torchao when it is installed, which logs a line per prebuilt extension it cannot load
    on this machine and torch warns about its pytree registrations: noise in every report, not a problem."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_reference(checkpoint_dir, dtype: torch.dtype = torch.float32, device="cpu", attention: str = "eager",
                   direct_to_device: bool = True, device_map=None, max_memory: dict | None = None,
                   experts: str | None = "eager", allocator_warmup: bool = False):
    """Qwen3ForCausalLM (Qwen3MoeForCausalLM for a qwen3_moe checkpoint, its experts run by transformers' eager loop)
    from the checkpoint, eager attention by default (the trusted side of every diff).
    A GPU `device` gets the weights straight onto it (transformers' fastest load; direct_to_device=False stages the
    whole model in host memory first, which a 30B model's float32 reference, 122 GB, overflows). device_map ("auto",
    "balanced" or accelerate's dict) with max_memory ({gpu index: bytes}) splits it across GPUs through accelerate,
    the maintained engine for that in the transformers ecosystem. experts: a MoE model's experts implementation
    (None: transformers' default, grouped_mm where it can run; a benchmark's fair baseline).
    allocator_warmup: let transformers reserve the model's bytes as one block before a GPU load (its default, a
    faster load). Off by default: a notebook frees its references to make room for the next, and any small tensor
    allocated later inside that block's slack keeps the whole block reserved after the model is gone (notebook 04 on
    a 30B model on an H200 found 56.9 GiB still reserved after its bfloat16 reference was deleted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_optional_imports()
    import transformers
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
        with warnings.catch_warnings(), _allocator_warmup(allocator_warmup):  # warnings: "the quantization_config
            # from the model will be used", as intended
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            cfg = read_config(Path(checkpoint_dir))
            moe = {"experts_implementation": experts} if cfg.is_moe and experts else {}
            model = getattr(transformers, cfg.architecture).from_pretrained(
                str(checkpoint_dir), dtype=dtype, attn_implementation=attention, local_files_only=True, **placement,
                **moe, **_quantized_kwargs(checkpoint_dir))
    except (OSError, ValueError, ImportError) as e:
        raise QwenlabError(f"{checkpoint_dir}: transformers could not load it ({str(e).splitlines()[0]})") from None
    _weights_in(model, dtype)
    return (model if placement else model.to(device)).eval()


@contextlib.contextmanager
def _allocator_warmup(enabled: bool):
    """transformers.modeling_utils.caching_allocator_warmup as it is, or a no-op for the load (there is no option)."""
    from transformers import modeling_utils

    original = getattr(modeling_utils, "caching_allocator_warmup", None)
    if enabled or original is None:
        yield
        return
    modeling_utils.caching_allocator_warmup = lambda *args, **kwargs: None
    try:
        yield
    finally:
        modeling_utils.caching_allocator_warmup = original


def _weights_in(model, dtype: torch.dtype):
    """Some transformers versions (5.17) leave the weights that compressed-tensors decompressed in bfloat16 inside a
    float32 model, whose first matmul then fails on the dtypes. Their values are bfloat16 numbers (NVFP4 values
    times scales, dequantized through bfloat16), so holding them in the asked dtype changes no number."""
    if dtype not in (torch.float32, torch.float64):
        return  # only an upcast is exact; a bf16 model may keep modules in float32 on purpose
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point() and param.element_size() < dtype.itemsize and name in ("weight", "bias"):
                    param.data = param.data.to(dtype)


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


@functools.lru_cache(maxsize=8)
def _paths(config: Qwen3Config) -> dict[str, Reference]:
    return reference_paths(meta_model(config))


def rope_function():
    """transformers' own apply_rotary_pos_emb: q_rope/k_rope are the reference's function on its own q_norm/k_norm
    outputs and RoPE tables (transformers applies RoPE in a function, not a module, so no hook sees it)."""
    from transformers.models.qwen3 import modeling_qwen3

    fn = getattr(modeling_qwen3, "apply_rotary_pos_emb", None)
    if fn is None:
        raise QwenlabError(f"transformers {package_versions(('transformers',)).get('transformers')}: "
                           "modeling_qwen3.apply_rotary_pos_emb is gone, so the reference's q_rope/k_rope cannot "
                           "be captured (qwenlab is tested with transformers 5.23; pin it in requirements.txt)")
    return fn


def _hooks(model, paths: dict, wanted, record) -> list:
    """Forward hooks on the reference's modules for every wanted canonical name (and what RoPE needs)."""
    modules = dict(model.named_modules())
    rope, tables, norms = rope_function(), {}, {}
    handles = [modules["model.rotary_emb"].register_forward_hook(lambda m, a, out: tables.update(cos_sin=out))]

    def batched(x, where):
        return x[None] if where.flat else x  # transformers' MoE block flattens batch and tokens

    def output(name, where):
        def hook(m, args, out):
            if where.index and not isinstance(out, tuple):
                raise QwenlabError(f"reference: {where.path} returned one tensor, not a tuple holding {name} at "
                                   f"{where.index} (qwenlab reads transformers 5.23's MoE router; pin it)")
            record(name, batched(out[where.index] if isinstance(out, tuple) else out, where))
        return hook

    def first_input(name, where):
        return lambda m, args, kwargs: record(name, batched(args[0] if args else kwargs["hidden_states"], where))

    def rotated(name, which):
        def hook(m, args, out):
            norms[which] = out
            if which == "k":  # k_norm runs after q_norm: both are known, rotate them as the reference does
                q, k = rope(norms["q"].transpose(1, 2), out.transpose(1, 2), *tables["cos_sin"])
                record(name.replace("k_rope", "q_rope"), q.transpose(1, 2), wanted)
                record(name, k.transpose(1, 2), wanted)
        return hook

    for name, where in paths.items():
        if where.path not in modules:
            raise QwenlabError(f"reference: transformers' model has no module {where.path} (for {name})")
        module = modules[where.path]
        if where.kind == "rope":
            if name.endswith("k_rope"):
                q_path = where.path.replace("k_norm", "q_norm")
                handles.append(modules[q_path].register_forward_hook(rotated(name, "q")))
                handles.append(module.register_forward_hook(rotated(name, "k")))
        elif wanted(name):
            handles.append(module.register_forward_pre_hook(first_input(name, where), with_kwargs=True)
                           if where.kind == "input" else module.register_forward_hook(output(name, where)))
    return handles


def _routing_hooks(model, paths: dict, routing: dict[int, dict[int, list[int]]]) -> list:
    """Forward hooks on transformers' MoE routers giving {layer: {token: expert ids}} those experts, weighted as the
    router weighs its own choice (routing.forced_weights, as qwenlab's forcing hooks do)."""
    modules, norm = dict(model.named_modules()), bool(getattr(model.config, "norm_topk_prob", False))
    handles = []
    for layer, rows in routing.items():
        where = paths.get(f"layers.{layer}.mlp.router_ids")
        if where is None or where.path not in modules:
            raise QwenlabError(f"reference: no MoE router in layer {layer} to force experts at")

        def hook(m, args, out, rows=rows):
            logits, weights, ids = out
            ids = with_experts(ids, rows)
            return logits, forced_weights(weights, logits, ids, rows, norm), ids
        handles.append(modules[where.path].register_forward_hook(hook))
    return handles


def _teacher_forcing(model, inputs: dict[str, torch.Tensor]) -> list:
    """Pre-hooks feeding decoder layer i the given `layers.{i}.input` instead of what the layer before made."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        given = inputs.get(f"layers.{i}.input")
        if given is None:
            continue
        # the layer's hidden dtype is its norm's: a quantized layer may list a float32 scale first
        param = layer.input_layernorm.weight

        def hook(module, args, kwargs, x=given.to(param.device, param.dtype)[None]):
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


@torch.inference_mode()
def capture_reference(model, ids: list[int], include=None, to_cpu: bool = True,
                      inputs: dict[str, torch.Tensor] | None = None,
                      routing: dict[int, dict[int, list[int]]] | None = None) -> dict[str, torch.Tensor]:
    """The reference's canonical activations on one prompt (include: names or globs; None for all). inputs:
    {`layers.{i}.input`: tensor [T, hidden]} feeds those layers the given input (teacher forcing: each layer's
    error is then its own, qwenlab.activations.isolated). routing: {layer: {token: expert ids}} gives a MoE model's
    tokens those experts (the captured router ids and weights are the forced ones)."""
    acts = [layer.mlp.act_fn for layer in model.model.layers if hasattr(layer.mlp, "act_fn")]
    if len({id(act) for act in acts}) != len(acts):
        raise QwenlabError("reference: layers share one activation module, per-layer mlp.act hooks would collide")
    paths = _paths(config_from_dict(model.config.to_dict(), "reference config"))
    recorder = Recorder(to_cpu=to_cpu)

    def wanted(name):
        return include is None or any(name == p or fnmatchcase(name, p) for p in include)

    def record(name, x, keep=wanted):
        if keep(name):
            recorder(name)(x)

    handles = (_teacher_forcing(model, inputs or {}) + _routing_hooks(model, paths, routing or {})
               + _hooks(model, paths, wanted, record))
    try:
        model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: recorder.tensors[name] for name in paths if name in recorder.tensors}


def reference_generate(model, ids: list[int], max_new_tokens: int, stop_ids=(), **generate_kwargs) -> list[int]:
    """HF greedy generate; returns generated ids only (stop token included when it ended generation).
    generate_kwargs go to transformers' generate (e.g. cache_implementation="static", min_new_tokens)."""
    input_ids = torch.tensor([ids], device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None,
                         pad_token_id=(list(stop_ids) or [0])[0], temperature=None, top_p=None, top_k=None,
                         **generate_kwargs)
    return out[0, len(ids):].tolist()
