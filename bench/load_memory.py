"""What a load leaves allocated on CUDA besides the model's own state: notebook 06's memory gate in detail. Measures
cuBLAS's workspace as the notebook does, loads the checkpoint (quantized with --quant) with the allocator's history
recorded, and lists every live block that no parameter or buffer of the model owns, with the frames that made it.
A diagnostic; it prints and asserts nothing.

    python bench/load_memory.py --model /tmp/q4b --dtype bfloat16 --quant nvfp4
"""
import argparse
from collections import Counter

import torch

from qwenlab.checks.nvfp4_quantization import workspace_overhead
from qwenlab.memory.predict import measured_weight_bytes, quantized_weight_bytes
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir

MiB = 2 ** 20


def owned_ranges(model) -> list[tuple[int, int]]:
    out = set()
    for t in list(model.state_dict(keep_vars=True).values()) + list(model.buffers()):
        if t.is_cuda:
            s = t.untyped_storage()
            out.add((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return sorted(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default=None)
    args = ap.parse_args()
    before = torch.cuda.memory_allocated()
    workspace = workspace_overhead("cuda")
    torch.cuda.memory._record_memory_history(max_entries=200000)
    model = load(resolve_model_dir(args.model), args.dtype, "cuda", args.quant).model
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated() - before
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    owned = owned_ranges(model)
    stored, predicted = measured_weight_bytes(model), quantized_weight_bytes(model)
    print(f"allocated by workspace + load {after / MiB:.1f} MiB; workspace measured {workspace / MiB:.1f} MiB; model "
          f"state {stored / MiB:.1f} MiB; predicted {predicted / MiB:.1f} MiB; unexplained "
          f"{(after - workspace - predicted) / MiB:.1f} MiB")
    stray = Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            a = block["address"]
            if any(lo <= a < hi for lo, hi in owned):
                continue
            frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
                      for f in block.get("frames", []) if "torch/cuda/memory" not in f["filename"]][:8]
            stray[(block["requested_size"], " <- ".join(frames) or "(no frames: made before recording)")] += 1
    print(f"live blocks no parameter or buffer owns: {sum(stray.values())}, "
          f"{sum(size * n for (size, _), n in stray.items()) / MiB:.1f} MiB")
    for (size, where), n in stray.most_common(20):
        print(f"  {n} x {size / MiB:.2f} MiB: {where}")


if __name__ == "__main__":
    main()
