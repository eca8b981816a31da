"""The fused decoder layer's kernels (qwenlab.generation.fused_layer) one by one on the Qwen3-4B shapes, against the
plain bf16 GEMV and the decode attention they replace, and 36 fused layers chained in one CUDA graph without PDL
and with each of its trigger placements (fused_layer.PDL_MODES). Random bf16 weights; each GEMV timed in a CUDA
graph over copies of its weight totalling 256 MiB (read from HBM, not L2), the attention over one cache (in L2) and
over the 36 layers' caches in turn (from HBM, as in a decode step). A development tool: it prints numbers and
asserts none.

    python bench/fused_layer.py [--context 384] [--layers 36] [--out FILE.json]

Rows per projection: `plain` the engine's bf16 GEMV (qwenlab.generation.gemv), `fused, no prologue` the fused GEMV
with neither prologue nor epilogue (its tile and loop alone), `fused` as the layer runs it (RMSNorm prologue for
q/k/v and gate/up, SiLU(gate) x up epilogue for gate/up, residual epilogue for o and down).
"""
import argparse
import json

import torch

from qwenlab.bench.measure import copy_bandwidth, device_facts
from qwenlab.generation.decode_attention import decode_attention_static
from qwenlab.generation.fused_layer import PDL_MODES, PLAIN, RMS, FusedLayers, pdl_available
from qwenlab.generation.gemv import _graph_us, gemv, per_weight_us, rotated_copies
from qwenlab.model.config import config_from_dict
from qwenlab.model.kv_cache import StaticKVCache
from qwenlab.model.qwen3 import DecoderLayer, RMSNorm, Rotary
from qwenlab.model.tiny import config_json


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=384, help="valid cache slots the attention reads (of 512)")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = config_from_dict(config_json("qwen3-4b"))
    H, inter = cfg.hidden_size, cfg.intermediate_size
    bandwidth = copy_bandwidth(device)
    facts = device_facts(device)
    print(facts)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; PDL available: {pdl_available(device)}")
    fused = FusedLayers()
    norm = RMSNorm(H, cfg.rms_norm_eps).to(device, dtype)
    res = torch.randn(H, dtype=dtype, device=device)
    rows = []
    shapes = {"q/k/v": (cfg.q_size + 2 * cfg.kv_size, H, dict(prologue=RMS, norm=norm)),
              "o_proj": (H, cfg.q_size, dict(residual=res)),
              "gate/up": (2 * inter, H, dict(prologue=RMS, norm=norm, glu=True)),
              "down": (H, inter, dict(residual=res))}
    print(f"{'GEMV':<8} {'N x K':>12} {'plain us':>9} {'fused, no prologue us':>22} {'fused us':>9} {'GB/s':>6}")
    for name, (n, k, how) in shapes.items():
        ws = rotated_copies(torch.randn(n, k, dtype=dtype, device=device))
        xin = torch.randn(k, dtype=dtype, device=device)
        plain = per_weight_us(lambda w: gemv(xin, w), ws)
        bare = per_weight_us(lambda w: fused.gemv(xin, w, PLAIN), ws)
        full = per_weight_us(lambda w: fused.gemv(xin, w, **how), ws)
        row = {"gemv": name, "n": n, "k": k, "plain_us": plain, "fused_bare_us": bare, "fused_us": full}
        rows.append(row)
        print(f"{name:<8} {f'{n}x{k}':>12} {plain:>9.1f} {bare:>22.1f} {full:>9.1f} {n * k * 2 / full / 1e3:>6.0f}")

    cache = StaticKVCache.for_config(cfg, max_len=512, dtype=dtype, device=device)
    for t in (cache.k + cache.v):
        t.normal_()
    cache.crop(args.context - 1)
    cache.static_shapes = True
    positions = cache.positions(1, device)
    cos, sin = Rotary(cfg.head_dim, cfg.rope_theta).to(device)(positions, dtype)
    with torch.device(device):
        layers = [DecoderLayer(cfg, i, True, None).to(dtype) for i in range(args.layers)]
    for layer in layers:
        for p in layer.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    attn = layers[0].self_attn
    qkv = torch.randn(cfg.q_size + 2 * cfg.kv_size, dtype=dtype, device=device)
    q = torch.randn(1, cfg.num_attention_heads, 1, cfg.head_dim, dtype=dtype, device=device)
    kv = cache.layer(0)
    plain_attn = _graph_us(lambda: decode_attention_static(q, cache.k[0], cache.v[0], cache.pos), 20)
    fused_attn = _graph_us(lambda: fused.attend(qkv, attn, cos.reshape(-1), sin.reshape(-1), kv), 20)
    kvs = [cache.layer(i) for i in range(cfg.num_hidden_layers)]  # each layer's cache in turn: read from HBM
    cold_attn = per_weight_us(lambda one: fused.attend(qkv, attn, cos.reshape(-1), sin.reshape(-1), one), kvs)
    print(f"attention over {args.context} of 512 slots: decode attention {plain_attn:.1f} us; fused (q/k norm, RoPE, "
          f"cache write, attention, merge) {fused_attn:.1f} us, {cold_attn:.1f} us over the "
          f"{cfg.num_hidden_layers} layers' caches in turn ({sum(t.nbytes for t in cache.k + cache.v) / 1e6:.0f} MB)")
    h = torch.randn(1, 1, H, dtype=dtype, device=device)
    layer_bytes = sum(w.nbytes for w in (attn.qkv_proj.weight, attn.o_proj.weight, layers[0].mlp.gate_up_proj.weight,
                                         layers[0].mlp.down_proj.weight))
    chains = {}
    for mode, pdl in [("off", 0)] + (list(PDL_MODES.items()) if pdl_available(device) else []):
        runner = FusedLayers(pdl)

        def chain():
            y = h
            for i, layer in enumerate(layers):
                y = runner.layer(layer, y, cos, sin, cache.layer(i))
            return y
        us = _graph_us(chain, 1) / args.layers
        chains[f"pdl {mode}"] = us
        print(f"{args.layers} fused layers in one graph, PDL {mode}: {us:.1f} us a layer "
              f"({layer_bytes / us / 1e3:.0f} GB/s of its {layer_bytes / 1e6:.1f} MB of weights; floor "
              f"{layer_bytes / bandwidth * 1e6:.1f} us)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": facts, "copy_bandwidth": bandwidth, "context": args.context, "gemv": rows,
                       "attention_us": {"decode_attention": plain_attn, "fused": fused_attn, "fused_hbm": cold_attn},
                       "layer_us": chains, "layer_bytes": layer_bytes}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
