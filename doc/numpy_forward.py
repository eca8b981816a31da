"""A Qwen3 forward in plain NumPy (float32) that returns every canonical activation of doc/dump-format.md.

    python doc/numpy_forward.py MODEL_DIR IDS_JSON OUT.safetensors
IDS_JSON: the output of `qwenlab tokenize --model MODEL_DIR --text "..." --json` (its "ids"), or a JSON list of ids.
Reads float32/float16 checkpoints (NumPy has no bfloat16).
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def load_weights(model_dir: Path) -> dict:
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(str(model_dir / name)))
    return {name: w.astype(np.float32) for name, w in weights.items()}


def linear(x, w, name):  # checkpoint weights are [out, in]
    return x @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0)


def rms_norm(x, weight, eps):  # over the last axis; eps inside the sqrt; weight multiplies (not 1 + weight)
    x32 = x.astype(np.float32)
    return weight * (x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(eps))).astype(x.dtype)


def rope_cos_sin(T, head_dim, theta):  # [T, head_dim] each, computed in float32
    inv_freq = np.float32(1.0) / np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angles = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]  # position * inv_freq, [T, head_dim/2]
    angles = np.concatenate([angles, angles], axis=-1)  # the same angle for dimension j and j + head_dim/2
    return np.cos(angles), np.sin(angles)


def rotate_half(x):  # cat(-x2, x1), x1 the first half of the last axis
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def attention(q, k, v):  # q [T, heads, D], k/v [T, kv_heads, D] -> context [T, heads*D]
    T, heads, D = q.shape
    group = heads // k.shape[1]  # query heads per KV head
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # key j > query i: hidden (causal)
    context = np.empty_like(q)
    for h in range(heads):
        kv = h // group  # query heads 0..group-1 share KV head 0, and so on
        scores = (q[:, h] @ k[:, kv].T) * np.float32(D ** -0.5)
        scores = np.where(future, -np.inf, scores)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        context[:, h] = (p / p.sum(axis=-1, keepdims=True)) @ v[:, kv]
    return context.reshape(T, heads * D)


def forward(model_dir, prompt_ids, layer_inputs=None) -> dict:
    """layer_inputs: a reference dump's tensors; layer i then runs on its `layers.{i}.input` (an isolated dump)."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    w = load_weights(model_dir)
    heads, kv_heads, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg["rope_theta"]  # 5.x or 4.x config
    T = len(prompt_ids)
    cos, sin = (t[:, None, :] for t in rope_cos_sin(T, D, theta))  # broadcast over heads
    out = {}
    x = out["embed"] = w["model.embed_tokens.weight"][np.asarray(prompt_ids)]
    for i in range(cfg["num_hidden_layers"]):
        p, a, n = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"layers.{i}."
        x = layer_inputs[n + "input"] if layer_inputs is not None else x
        out[n + "input"] = x
        h = out[n + "input_layernorm"] = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = out[n + "attn.q_proj"] = linear(h, w, a + "q_proj")
        k = out[n + "attn.k_proj"] = linear(h, w, a + "k_proj")
        v = out[n + "attn.v_proj"] = linear(h, w, a + "v_proj")
        q = out[n + "attn.q_norm"] = rms_norm(q.reshape(T, heads, D), w[a + "q_norm.weight"], eps)  # per head
        k = out[n + "attn.k_norm"] = rms_norm(k.reshape(T, kv_heads, D), w[a + "k_norm.weight"], eps)
        q = out[n + "attn.q_rope"] = q * cos + rotate_half(q) * sin
        k = out[n + "attn.k_rope"] = k * cos + rotate_half(k) * sin
        context = out[n + "attn.context"] = attention(q, k, v.reshape(T, kv_heads, D))
        o = out[n + "attn.o_proj"] = linear(context, w, a + "o_proj")
        x = out[n + "post_attention_residual"] = x + o
        h = out[n + "post_attention_layernorm"] = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = out[n + "mlp.gate_proj"] = linear(h, w, p + "mlp.gate_proj")
        up = out[n + "mlp.up_proj"] = linear(h, w, p + "mlp.up_proj")
        act = out[n + "mlp.act"] = gate / (1 + np.exp(-gate))  # SiLU
        down = out[n + "mlp.down_proj"] = linear(act * up, w, p + "mlp.down_proj")
        x = out[n + "output"] = x + down
    out["norm"] = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    out["logits"] = out["norm"] @ head.T
    return out


if __name__ == "__main__":
    model, ids_file, dump = sys.argv[1:4]
    ids = json.loads(Path(ids_file).read_text())
    ids = ids["ids"] if isinstance(ids, dict) else ids
    tensors = {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in forward(model, ids).items()}
    save_file(tensors, dump, metadata={"producer": "doc/numpy_forward.py", "dtype": "float32",
                                       "prompt_ids": json.dumps(ids)})
    print(f"wrote {dump}: {len(tensors)} tensors, {len(ids)} tokens")
