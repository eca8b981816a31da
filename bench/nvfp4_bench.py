"""NVFP4 against the unquantized model: checkpoint bytes on disk, weight bytes after load (parameters + buffers, and
the linear weights alone), CUDA allocated by the load, peak memory, greedy decode tok/s, and which matmul path ran.

    python bench/nvfp4_bench.py                                     # tiny fixture, CPU: dense vs quant=nvfp4
    python bench/nvfp4_bench.py --device cuda --dtype bfloat16 --run bf16=/tmp/q4b --run nvfp4-at-load=/tmp/q4b:nvfp4 \\
        --run compressed-tensors=/tmp/q4b-ct --run modelopt=/tmp/q4b-mo --json out.json

Each --run is LABEL=DIR[:QUANT]; the runs load one after the other in this process (the previous model freed first).
"""
import argparse
import gc
import json
import platform
from pathlib import Path

import torch

from qwenlab.bench.measure import sync
from qwenlab.generation.decode import generate
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory.predict import measured_weight_bytes, quantized_weight_bytes
from qwenlab.model.loader import load
from qwenlab.model.tiny import ensure_tiny
from qwenlab.quant import fp4_gemm
from qwenlab.quant.linear import KERNEL_TEXT, NVFP4Linear
from qwenlab.versions import package_versions as versions

PROMPT = "The lighthouse on the northern point had been dark for eleven years when the town decided to restore it."


def disk_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def linear_bytes(model) -> int:
    """Bytes of the decoder layers' projections (q/k/v/o, gate/up/down): packed codes + scales for NVFP4."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, NVFP4Linear):
            total += sum(b.untyped_storage().nbytes() for b in module.buffers())
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.untyped_storage().nbytes()
    return total


def allocated(device) -> float:
    sync(device)
    return float(torch.cuda.memory_allocated(device)) if device.type == "cuda" else float("nan")


def peak(device) -> float:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure(label: str, folder: str, quant: str | None, device: torch.device, dtype: str, new_tokens: int) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = allocated(device)
    reset_peak(device)
    ckpt = load(folder, dtype, str(device), quant=quant)
    model = ckpt.model
    row = {"label": label, "model": str(folder), "quant": quant, "disk_bytes": disk_bytes(folder),
           "weight_bytes": measured_weight_bytes(model), "predicted_weight_bytes": quantized_weight_bytes(model),
           "linear_weight_bytes": linear_bytes(model), "cuda_allocated_by_load": allocated(device) - before,
           "cuda_peak_during_load": peak(device) - before}
    info = model.quantization
    row["path"] = KERNEL_TEXT[info.kernel] if info else "dense (torch matmul in the run dtype)"
    row["quantization"] = info.summary() if info else None
    ids = ckpt.tokenizer.encode(PROMPT)
    generate(model, ids, SamplingParams(max_new_tokens=4), stop_ids=())  # warm-up
    reset_peak(device)
    gen = generate(model, ids, SamplingParams(max_new_tokens=new_tokens), stop_ids=())
    row |= {"decode_tokens": len(gen.ids), "prefill_s": gen.prefill_s, "decode_tok_s": gen.decode_tok_s,
            "cuda_peak_during_decode": peak(device) - before, "greedy_ids_head": gen.ids[:8]}
    del ckpt, model
    return row


def table(rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = [f"{'run':<20} {'disk MiB':>9} {'weights MiB':>12} {'linears MiB':>12} {'alloc MiB':>10} "
             f"{'peak MiB':>9} {'tok/s':>7}  path"]
    for r in rows:
        lines.append(f"{r['label']:<20} {r['disk_bytes'] / mib:>9.1f} {r['weight_bytes'] / mib:>12.1f} "
                     f"{r['linear_weight_bytes'] / mib:>12.1f} {r['cuda_allocated_by_load'] / mib:>10.1f} "
                     f"{r['cuda_peak_during_decode'] / mib:>9.1f} {r['decode_tok_s']:>7.1f}  {r['path']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=DIR[:QUANT]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the rows (and the ratios) to this file")
    args = ap.parse_args()
    runs = args.run or [f"dense={ensure_tiny()}", f"nvfp4-at-load={ensure_tiny()}:nvfp4"]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"device: {device} ({name}), dtype {args.dtype}; native FP4 GEMM available: {fp4_gemm.available(device)}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    rows = []
    for spec in runs:
        label, _, rest = spec.partition("=")
        folder, _, quant = rest.partition(":")
        rows.append(measure(label, folder, quant or None, device, args.dtype, args.new_tokens))
        print(f"  {label}: {rows[-1]['decode_tok_s']:.1f} tok/s, {rows[-1]['path']}", flush=True)
    print(table(rows))
    base = rows[0]
    ratios = {r["label"]: {"disk": base["disk_bytes"] / r["disk_bytes"],
                           "weights": base["weight_bytes"] / r["weight_bytes"],
                           "linear_weights": base["linear_weight_bytes"] / r["linear_weight_bytes"],
                           "decode_tok_s": r["decode_tok_s"] / base["decode_tok_s"]} for r in rows[1:]}
    for label, ratio in ratios.items():
        print(f"{base['label']} / {label}: disk {ratio['disk']:.2f}x, weights {ratio['weights']:.2f}x, "
              f"linear weights {ratio['linear_weights']:.2f}x smaller; decode speed x{ratio['decode_tok_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "device_name": name, "dtype": args.dtype,
                                               "versions": versions(), "rows": rows, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
