"""How long a checkpoint takes to reach the GPU, piece by piece, side by side in one process (the files read once
first, so every row reads from the page cache, as a notebook does after the report's first load). Each row runs
--repeat times: the first run of a row pays what a process pays once (CUDA's lazy module loads, imports).

    finite check, host   qwenlab.model.files.check_finite: every tensor checked for NaN/inf on the CPU (the
                         loader's up-front check)
    tensor reads         safetensors' mmap -> host tensor -> .to(device), tensor by tensor (the loader's reads)
    qwenlab load_model   the whole load as notebooks make it (validation, reads, fusing, model built)
    transformers         from_pretrained(dtype, device_map=device), the reference's load in notebooks 02-04, 06, 07

    python bench/load_speed.py --model /tmp/q4b [--device cuda] [--dtype bfloat16] [--repeat 2] [--hf]
"""
import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwenlab.bench.measure import device_facts, timed  # noqa: E402
from qwenlab.model.files import check_finite, weight_files  # noqa: E402
from qwenlab.model.loader import load_model  # noqa: E402


def reads(files, device):
    handles, out = {}, []
    for name, path in files.items():
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt", device="cpu")
        out.append(handles[path].get_tensor(name).to(device))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--hf", action="store_true", help="also time transformers' from_pretrained")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    files = weight_files(Path(a.model))
    nbytes = sum(Path(f).stat().st_size for f in set(files.values()))
    for path in set(files.values()):  # into the page cache
        with open(path, "rb") as f:
            while f.read(256 << 20):
                pass
    print(" | ".join(f"{k} {v}" for k, v in device_facts(device).items()))
    print(f"checkpoint {a.model}: {len(files)} tensors, {nbytes / 1e9:.3f} GB in {len(set(files.values()))} file(s)")

    def hf():
        import transformers

        from qwenlab.model.config import read_config
        cfg = read_config(Path(a.model))
        return getattr(transformers, cfg.architecture).from_pretrained(
            a.model, dtype=getattr(torch, a.dtype), device_map=str(device), local_files_only=True)

    rows = [("finite check, host", lambda: check_finite(files)),
            ("tensor reads", lambda: reads(files, device)),
            ("qwenlab load_model", lambda: load_model(a.model, dtype=a.dtype, device=str(device)))]
    if a.hf:
        rows.append(("transformers", hf))
    results = []
    for label, fn in rows:
        times = []
        for _ in range(a.repeat):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            kept, seconds = timed(fn, device)
            times.append(seconds)
            del kept
        best = min(times)
        results.append({"row": label, "seconds": [round(t, 3) for t in times], "best_s": round(best, 3),
                        "gb_per_s": round(nbytes / best / 1e9, 2)})
        print(f"  {label:20s} best {best:7.3f} s  ({nbytes / best / 1e9:6.2f} GB/s)   runs: "
              + ", ".join(f"{t:.3f}" for t in times), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "bytes": nbytes, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
