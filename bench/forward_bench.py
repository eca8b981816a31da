"""Forward time of qwenlab vs transformers on one checkpoint, with hook points unused and reading every canonical
activation, side by side.

    python bench/forward_bench.py                       # embedded tiny fixture, CPU, float32
    python bench/forward_bench.py --model DIR --device cuda --dtype bfloat16 --tokens 512

Prints the device and library versions with every number; medians over --repeat runs after a warm-up.
"""
import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from qwenlab.activations.capture import capture_qwenlab  # noqa: E402
from qwenlab.activations.reference import capture_reference, load_reference  # noqa: E402
from qwenlab.model.loader import load  # noqa: E402
from qwenlab.model.tiny import ensure_tiny  # noqa: E402
from qwenlab.versions import package_versions as versions  # noqa: E402


def timed(fn, device, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=128, help="prompt length of the timed prefill")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    model_dir = args.model or ensure_tiny()
    ckpt = load(model_dir, args.dtype, args.device)
    model, device = ckpt.model, ckpt.model.device
    hf = load_reference(model_dir, model.dtype, device)
    ids = torch.randint(0, 150000, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.tensor(ids, device=device)
    hf_x = x[None]

    rows = []
    with torch.inference_mode():
        for attention in ("sdpa", "eager"):
            rows.append((f"qwenlab ({attention})", timed(lambda: model(x, attention=attention), device, args.repeat)))
        rows.append(("transformers (eager)", timed(lambda: hf(input_ids=hf_x, use_cache=False), device, args.repeat)))
    rows.append(("qwenlab (sdpa), every hook read", timed(lambda: capture_qwenlab(model, ids), device, args.repeat)))
    rows.append(("transformers + hook capture", timed(lambda: capture_reference(hf, ids), device, args.repeat)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), threads {torch.get_num_threads()}, dtype {model.dtype}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    cfg = ckpt.config
    print(f"model: {model_dir} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), prefill of {args.tokens} "
          f"tokens, median of {args.repeat}")
    base = rows[0][1]
    hf_time = rows[2][1]
    print(f"{'path':<30} {'ms':>10} {'vs qwenlab':>11} {'vs HF':>8}")
    for label, seconds in rows:
        print(f"{label:<30} {seconds * 1e3:>10.2f} {seconds / base:>10.2f}x {seconds / hf_time:>7.2f}x")
    print(f"reading every hook point: {(rows[3][1] / base - 1) * 100:+.1f}% over the forward with none read")


if __name__ == "__main__":
    main()
