"""Decode speed, gpt-fast style: prefill time, tok/s and weight GB/s for kv vs replay at a few prompt lengths.

    python bench/decode_bench.py                                    # embedded tiny fixture, CPU
    python bench/decode_bench.py --model DIR --device cuda --dtype bfloat16 --lengths 128,1024,4096

Greedy, stop tokens off so every run decodes exactly --new-tokens; median tok/s over --repeat runs.
"""
import argparse
import contextlib
import platform
import statistics

import torch
import torch.nn.functional as F

import qwenlab.model.qwen3
from qwenlab.activations.reference import versions
from qwenlab.generation.decode import generate
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.loader import load
from qwenlab.model.tiny import ensure_tiny


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="32,256")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--modes", default="kv,replay")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare-sdpa-decode", action="store_true",
                    help="also time the decode step through F.scaled_dot_product_attention(enable_gqa=True)")
    ap.add_argument("--profile", action="store_true", help="print the top ops of 8 kv decode steps (torch.profiler)")
    args = ap.parse_args()

    ckpt = load(args.model or ensure_tiny(), args.dtype, args.device)
    model, device = ckpt.model, ckpt.model.device
    wbytes = weight_bytes(model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"device: {device} ({name}), dtype {model.dtype}, threads {torch.get_num_threads()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"model: {ckpt.path} ({ckpt.config.num_hidden_layers} layers, {wbytes / 1e9:.2f} GB of weights); "
          f"{args.new_tokens} new tokens, median of {args.repeat}")
    print(f"{'mode':<7} {'prompt':>7} {'prefill ms':>11} {'tok/s':>9} {'ms/tok':>8} {'weight GB/s':>12}")
    params = SamplingParams(max_new_tokens=args.new_tokens)
    gen = torch.Generator().manual_seed(0)
    variants = [(m, m) for m in args.modes.split(",")]
    if args.compare_sdpa_decode:
        variants.append(("kv-sdpa", "kv"))
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, 150000, (length,), generator=gen).tolist()
        for label, mode in variants:
            with sdpa_decode(label == "kv-sdpa"):
                generate(model, ids, SamplingParams(max_new_tokens=2), stop_ids=(-1,), mode=mode)
                runs = [generate(model, ids, params, stop_ids=(-1,), mode=mode) for _ in range(args.repeat)]
            tok_s = statistics.median(r.decode_tok_s for r in runs)
            prefill = statistics.median(r.prefill_s for r in runs)
            print(f"{label:<7} {length:>7} {prefill * 1e3:>11.2f} {tok_s:>9.1f} {1e3 / tok_s:>8.2f} "
                  f"{wbytes * tok_s / 1e9:>12.1f}")
    if args.profile:
        profile_decode(model, ids)


@contextlib.contextmanager
def sdpa_decode(enabled: bool):
    """Routes the one-token decode attention through SDPA with enable_gqa, for an A/B in the same run."""
    if not enabled:
        yield
        return
    original = qwenlab.model.decode_attention
    qwenlab.model.decode_attention = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    try:
        yield
    finally:
        qwenlab.model.decode_attention = original


def profile_decode(model, ids):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    for label in ("kv", "kv-sdpa"):
        with sdpa_decode(label == "kv-sdpa"), profile(activities=activities) as prof:
            generate(model, ids, SamplingParams(max_new_tokens=8), stop_ids=(-1,))
        sort = "self_cuda_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile of 8 decode steps ({label}), top ops by {sort}:")
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=48))


if __name__ == "__main__":
    main()
