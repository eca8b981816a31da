"""The fused NVFP4 layer's GEMV tiles (qwenlab.quant.triton_nvfp4.LAYER_CONFIGS) timed where they run: the graph
engine's whole decode step on an NVFP4 model, captured once per tile tried for one kind of GEMV (q/k/v with the
input norm, o and down with the residual add, gate/up with the norm and SiLU), the others at their defaults, and
replayed side by side in one process. --sweep KEY=V1,V2 instead tries one config key's values (integers, 0 for
unset) on each kind's default tile, e.g. MAXNREG (the registers a thread may hold, so more programs fit an SM),
and --set KEY=V sets a key on every default tile first (PAIRS=1: the tensor-core GEMV, qwenlab.quant.pair_nvfp4;
with it, --sweep LITE=0,1,2,3 times that GEMV without its decode, its block scales or both: a wrong result, for
timing only). --try KIND:KEY=V,... tries one tile for one kind instead. CUDA only; a development tool that prints
its numbers and asserts none.

    python bench/nvfp4_layer_tiles.py --model /tmp/q4b [--context 512] [--set PAIRS=1] [--sweep MAXNREG=128,96]
    python bench/nvfp4_layer_tiles.py --model /tmp/q4b --set PAIRS=1 --sweep LITE=0,1,2,3
    python bench/nvfp4_layer_tiles.py --model /tmp/q4b --try norm:PAIRS=1 --try norm:PAIRS=1,SPLIT=2
    python bench/nvfp4_layer_tiles.py --model /tmp/q4b --try norm:PAIRS=1,ONCE=1 --try glu:ONCE=0
"""
import argparse
import sys

import torch
from decode_profile import replay_ms

from qwenlab.bench.measure import copy_bandwidth, device_facts, weight_bytes
from qwenlab.generation.engine import Engine
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.quant import triton_nvfp4

SMALL, LARGE = triton_nvfp4.WIDE_CONFIGS["small"], triton_nvfp4.WIDE_CONFIGS["large"]
# per kind of layer GEMV, the tiles tried beside its default (RN rows x VW words a thread, TN lanes along the
# rows, WARPS; S_PAIRS: block scales two at a time; SPLIT: the split along K of o and down)
TRIES = {
    "norm": [LARGE, {**LARGE, "S_PAIRS": True}, {**SMALL, "WARPS": 2}, {**SMALL, "S_PAIRS": False},
             {"RN": 1, "VW": 4, "TN": 2, "WARPS": 4, "S_PAIRS": True}],
    "glu": [{"RN": 1, "VW": 4, "TN": 2, "WARPS": 4, "S_PAIRS": False}, {"RN": 2, "VW": 4, "TN": 2, "WARPS": 4,
                                                                         "S_PAIRS": False},
            {"RN": 2, "VW": 4, "TN": 2, "WARPS": 2, "S_PAIRS": True}, {"RN": 1, "VW": 4, "TN": 2, "WARPS": 2,
                                                                       "S_PAIRS": True}],
    "residual": [{**SMALL, "SPLIT": 2}, {**SMALL, "SPLIT": 8}, LARGE, {**LARGE, "S_PAIRS": True},
                 {**SMALL, "WARPS": 2}],
}


def step_ms(model, context: int) -> float:
    engine = Engine(model, "graph")
    cache = engine.new_cache(context)
    model(torch.arange(128, device=model.device), cache=cache)
    step, _ = engine.captured(cache)
    cache.crop(128)
    return replay_ms(step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--sweep", default=None, help="KEY=V1,V2,...: one config key's values on each default tile")
    ap.add_argument("--set", default=[], action="append", help="KEY=V: an integer set on every default tile")
    ap.add_argument("--try", dest="tries", default=[], action="append",
                    help="KIND:KEY=V,KEY=V: one tile to try for one kind (norm, residual, glu), its keys over the "
                         "default's (instead of the built-in tries; repeat for more)")
    args = ap.parse_args(argv)
    for item in args.set:
        key, value = item.split("=")
        for config in triton_nvfp4.LAYER_CONFIGS.values():
            config[key] = int(value)
    model = load(resolve_model_dir(args.model), "bfloat16", "cuda", "nvfp4").model
    wbytes, bandwidth = weight_bytes(model), copy_bandwidth(model.device)
    print(device_facts(model.device))
    print(f"weights {wbytes / 1e9:.3f} GB, copy bandwidth {bandwidth / 1e9:.0f} GB/s, floor "
          f"{wbytes / bandwidth * 1e3:.3f} ms; ms per decode step (graph replay), each tile against the default")
    defaults = {kind: dict(config) for kind, config in triton_nvfp4.LAYER_CONFIGS.items()}
    base = step_ms(model, args.context)
    print(f"default {defaults}: {base:.3f} ms", flush=True)
    tries_by_kind = TRIES
    if args.tries:
        tries_by_kind = {}
        for item in args.tries:
            kind, keys = item.split(":")
            tile = {**defaults[kind], **{k: int(v) for k, v in (pair.split("=") for pair in keys.split(","))}}
            tries_by_kind.setdefault(kind, []).append(tile)
    if args.sweep:
        key, values = args.sweep.split("=")
        tries_by_kind = {kind: [{**{k: v for k, v in config.items() if k != key}, **({key: int(v)} if int(v) else {})}
                                for v in values.split(",")] for kind, config in defaults.items()}
    for kind, tries in tries_by_kind.items():
        for config in tries:
            triton_nvfp4.LAYER_CONFIGS[kind] = config
            try:
                ms = step_ms(model, args.context)
                print(f"{kind:<9} {config}: {ms:.3f} ms ({base / ms:.3f}x the default)", flush=True)
            except Exception as e:  # a tile that does not compile or fit: say so, try the next
                print(f"{kind:<9} {config}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            finally:
                triton_nvfp4.LAYER_CONFIGS[kind] = defaults[kind]
    print(f"default again: {step_ms(model, args.context):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
