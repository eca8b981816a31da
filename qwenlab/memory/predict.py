"""Predicted memory of a Qwen3 inference run from its config alone: weights, KV cache, workspace.

The tracker (qwenlab.memory) measures; this module says what the measurement should be, so
"measured minus predicted" separates the bytes the model needs from the bytes a bug or the
allocator adds. Every formula counts tensors of the plain-torch forward in qwenlab.model.

A MoE model (Qwen3-MoE) keeps every expert resident: its weights are all experts' bytes, though a token uses only
num_experts_per_tok of them; the KV cache is the dense formula (attention is unchanged).

Workspace is an estimate, not an identity: the peak of one prefill is the largest set of
temporaries alive at once, which for this forward is the MLP (gate, up, act and act*up,
each [T, intermediate]) plus a few float32 [T, hidden] tensors of the RMSNorms, the
attention scores when the kernel materialises them (eager, or sdpa's math fallback), and
the logits. Expect the measured prefill peak above the resident bytes to land within a
factor of about two of it.
"""
import gc
import math
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from qwenlab.generation.decode import new_cache
from qwenlab.model.config import Qwen3Config, is_moe_layer
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.hf_names import hf_shapes
from qwenlab.model.hf_names import linear_shapes as hf_linear_shapes
from qwenlab.model.nvfp4_load import ROUTERS
from qwenlab.quant.layouts import matches

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1}
# NVFP4 (NVIDIA ModelOpt): 4-bit e2m1 values, one fp8 (e4m3) scale per 16 consecutive elements of a row,
# one fp32 global scale per tensor: 4.5 bits per element plus 4 bytes per tensor.
NVFP4 = "nvfp4"
NVFP4_BLOCK = 16


def bytes_per_element(dtype) -> float:
    name = dtype_name(dtype)
    if name == NVFP4:
        return 0.5 + 1 / NVFP4_BLOCK
    if name not in BYTES:
        raise ValueError(f"dtype {name!r}: no byte size known (one of {', '.join([*BYTES, NVFP4])})")
    return BYTES[name]


GROUPS = ("embed_tokens", "attn_proj", "attn_bias", "mlp_proj", "norms", "lm_head")


def weight_group(name: str) -> str:
    """The group of an HF weight name: embed_tokens, attn_proj, attn_bias, mlp_proj, norms or lm_head."""
    if name.startswith("model.embed_tokens."):
        return "embed_tokens"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.endswith("norm.weight"):
        return "norms"
    if ".self_attn." in name:
        return "attn_bias" if name.endswith(".bias") else "attn_proj"
    return "mlp_proj"


def param_counts(cfg: Qwen3Config) -> dict[str, int]:
    """Parameters by group, from the checkpoint layout (qwenlab.model.hf_names); a tied lm_head counts zero."""
    counts = dict.fromkeys(GROUPS, 0)
    for name, shape in hf_shapes(cfg).items():
        counts[weight_group(name)] += math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts


def nvfp4_linear_bytes(out_features: int, in_features: int) -> int:
    packed = out_features * in_features // 2 + (out_features * in_features) % 2
    scales = out_features * math.ceil(in_features / NVFP4_BLOCK)
    return packed + scales + 4


def weight_bytes(cfg: Qwen3Config, dtype="bfloat16", *, base_dtype="bfloat16",
                 quantize_lm_head: bool = False) -> dict[str, int]:
    """Bytes of the weights by group. dtype='nvfp4' quantizes the decoder projections whose input dimension is a
    multiple of 16 (and the lm_head when quantize_lm_head); everything else stays in base_dtype, as NVFP4
    checkpoints ship it, a MoE model's routers included (mlp.gate, counted in mlp_proj)."""
    quantized = dtype_name(dtype) == NVFP4
    b = bytes_per_element(base_dtype if quantized else dtype)
    linears = {f"{m}.weight": shape for m, shape in hf_linear_shapes(cfg).items()}
    out = dict.fromkeys(GROUPS, 0)
    for name, shape in hf_shapes(cfg).items():
        group = weight_group(name)
        as_nvfp4 = (quantized and name in linears and shape[1] % NVFP4_BLOCK == 0
                    and (group != "lm_head" or quantize_lm_head) and not matches(name.removesuffix(".weight"), ROUTERS))
        out[group] += nvfp4_linear_bytes(*shape) if as_nvfp4 else int(math.prod(shape) * b)
    out["total"] = sum(out.values())
    return out


def quantized_weight_bytes(model) -> int:
    """Predicted weight bytes of a model loaded with NVFP4 linears (model.quantization): the unquantized model in its
    dtype, each quantized linear replaced by its NVFP4 bytes (+4 for an input scale); a quantized head of a tied model
    is a copy of its own. Falls back to weight_bytes for an unquantized model."""
    info = model.quantization
    cfg = model.config
    total = weight_bytes(cfg, model.dtype)["total"]
    if info is None:
        return total
    b, shapes = bytes_per_element(model.dtype), hf_linear_shapes(cfg)
    for name in info.quantized:
        out_features, in_features = shapes[name]
        if not (name == "lm_head" and cfg.tie_word_embeddings):
            total -= int(out_features * in_features * b)
        module = model.get_submodule(name)
        total += nvfp4_linear_bytes(out_features, in_features) + (4 if module.input_scale is not None else 0)
    return total


def kv_bytes_per_token(cfg: Qwen3Config, dtype="bfloat16") -> int:
    """K and V, every layer: 2 x layers x kv_heads x head_dim x bytes."""
    return int(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * bytes_per_element(dtype))


def kv_cache_bytes(cfg: Qwen3Config, dtype="bfloat16", length: int = 1, batch: int = 1) -> int:
    """A preallocated cache holds max_len positions; a grown one holds exactly the positions written so far."""
    return batch * length * kv_bytes_per_token(cfg, dtype)


def mlp_width(cfg: Qwen3Config) -> int:
    """The width of the widest MLP temporaries: a dense layer's intermediate_size, or one expert's (a MoE block runs
    its experts one at a time, each on at most every token)."""
    dense = any(not is_moe_layer(cfg, i) for i in range(cfg.num_hidden_layers))
    return max(cfg.intermediate_size if dense else 0, cfg.moe_intermediate_size)


def workspace_bytes(cfg: Qwen3Config, dtype="bfloat16", tokens: int = 1, *, context: int | None = None,
                    logits_tokens: int = 1, scores_materialised: bool = False) -> dict[str, int]:
    """Temporaries of one forward over `tokens` new positions attending to `context` positions (default: tokens).

    logits: [logits_tokens, vocab] in the model dtype plus the float32 copy the sampler takes (qwenlab's
    generate asks for the last position only: logits_tokens=1; a capture or HF's forward keeps [T, V]).
    activations: MLP peak 4 x [T, intermediate] in the model dtype (mlp_width) + 3 x [T, hidden] float32 (RMSNorm
    upcast) + q/k/v and the RoPE temporaries (about 4 x [T, q_size]); for MoE also the router's logits and float32
    probabilities [T, experts] and the block's gathered input and output [T, hidden].
    attention_scores: [heads, T, context] float32 scores and weights when materialised (eager attention)."""
    b = bytes_per_element(dtype if dtype_name(dtype) != NVFP4 else "bfloat16")
    T, S = tokens, context if context is not None else tokens
    logits = int(logits_tokens * cfg.vocab_size * (b + 4))
    activations = int(T * (4 * mlp_width(cfg) * b + 3 * cfg.hidden_size * 4 + 4 * cfg.q_size * b
                           + 2 * cfg.kv_size * b))
    if cfg.is_moe:
        activations += int(T * (cfg.num_experts * (b + 4) + 2 * cfg.hidden_size * b))
    scores = int(2 * cfg.num_attention_heads * T * S * 4) if scores_materialised else 0
    return {"logits": logits, "activations": activations, "attention_scores": scores,
            "total": logits + activations + scores}


@dataclass
class MemoryPrediction:
    weights: int
    kv_cache: int
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def predict(cfg: Qwen3Config, dtype="bfloat16", *, kv_len: int, prefill_tokens: int,
            scores_materialised: bool = False) -> MemoryPrediction:
    """Resident weights + a KV cache of kv_len positions + the workspace of one prefill of prefill_tokens."""
    return MemoryPrediction(weight_bytes(cfg, dtype)["total"], kv_cache_bytes(cfg, dtype, kv_len),
                            workspace_bytes(cfg, dtype, prefill_tokens,
                                            scores_materialised=scores_materialised)["total"])


def compare(label: str, measured: float, predicted: float, rel_threshold: float) -> dict:
    """One row of 'measured minus predicted': flagged when |measured - predicted| / predicted > rel_threshold."""
    delta = measured - predicted
    rel = abs(delta) / predicted if predicted else math.inf
    return {"quantity": label, "predicted_bytes": predicted, "measured_bytes": measured, "delta_bytes": delta,
            "rel_error": rel, "flagged": bool(not rel <= rel_threshold)}


def measured_weight_bytes(model) -> int:
    """Bytes of the model's saved state (parameters and persistent buffers; RoPE tables are not weights), each
    storage counted once (a tied head shares the embedding)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measured_param_count(model) -> int:
    seen, total = set(), 0
    for t in model.parameters():
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def _allocated(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float(torch.cuda.memory_allocated(device))
    return math.nan


def measure_kv(model, lengths, *, ids_seed: int = 0):
    """For each context length L: a preallocated cache of L positions (new_cache) and a grown cache filled by a
    prefill of L tokens. Measured: the cache's own tensor bytes (KVCache.nbytes) and, on CUDA, the allocated delta
    the cache leaves behind (on CPU the process RSS is too coarse: glibc reuses freed heap). On CUDA also the
    prefill's workspace: its peak allocated above what was resident when it started. A grown cache can cost more
    than its bytes on CUDA: its tensors reuse freed allocator blocks that are too small to split, and the allocator
    counts the whole block (on an H100, 17 MiB over 144 MiB at 1024 tokens; the preallocated cache was exact)."""
    cfg, device, dtype = model.config, model.device, model.dtype
    per_token = kv_bytes_per_token(cfg, dtype)
    gen = torch.Generator().manual_seed(ids_seed)
    rows = []
    for L in lengths:
        ids = torch.randint(0, cfg.vocab_size, (L,), generator=gen).to(device)
        gc.collect()
        before = _allocated(device)
        cache = new_cache(model, L, preallocate=True)
        alloc_delta = _allocated(device) - before
        workspace = math.nan
        if device.type == "cuda":
            resident = _allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(ids, cache=cache, last_only=True)
            torch.cuda.synchronize(device)
            workspace = torch.cuda.max_memory_allocated(device) - resident
        rows.append({"layout": "preallocated", "length": L, "predicted_bytes": per_token * L,
                     "kv_nbytes": cache.nbytes(), "cuda_allocated_delta": alloc_delta,
                     "prefill_workspace_bytes": workspace,
                     "workspace_predicted_bytes": workspace_bytes(cfg, dtype, L)["total"]})
        del cache
        gc.collect()
        before = _allocated(device)
        cache = new_cache(model, L, preallocate=False)
        logits = model(ids, cache=cache, last_only=True)
        del logits
        rows.append({"layout": "grown", "length": L, "predicted_bytes": per_token * cache.length,
                     "kv_nbytes": cache.nbytes(), "cuda_allocated_delta": _allocated(device) - before,
                     "prefill_workspace_bytes": math.nan,
                     "workspace_predicted_bytes": math.nan})
        del cache
    frame = pd.DataFrame(rows)
    frame["rel_error"] = (frame["kv_nbytes"] - frame["predicted_bytes"]).abs() / frame["predicted_bytes"]
    predicted = frame["predicted_bytes"]
    frame["cuda_rel_error"] = (frame["cuda_allocated_delta"] - predicted).abs() / predicted
    frame["workspace_ratio"] = frame["prefill_workspace_bytes"] / frame["workspace_predicted_bytes"]
    return frame


def weights_check(model, measured_cuda_bytes: float, rel_threshold: float):
    """Predicted weight bytes for the model's dtype vs its parameter storage and (CUDA) the allocated bytes
    the load left resident. Returns a DataFrame of compare() rows."""
    predicted = quantized_weight_bytes(model)
    rows = [compare("weights: parameter storage", measured_weight_bytes(model), predicted, rel_threshold)]
    if model.quantization is None:  # NVFP4 weights are buffers: no parameter count to compare
        rows.append(compare("weights: parameter count", measured_param_count(model),
                            param_counts(model.config)["total"], rel_threshold))
    if not math.isnan(measured_cuda_bytes):
        rows.append(compare("weights: CUDA allocated after load", measured_cuda_bytes, predicted, rel_threshold))
    return pd.DataFrame(rows)
