"""A bug confined to one deep layer, named by the isolated (teacher-forced) errors: on CHECKPOINT in DTYPE, the correct
model, then layer LAYER alone rotating q and k with RoPE base x FACTOR, then layer LAYER skipping its k RMSNorm. For
each: the accumulated diff's first tensor over its floor and largest error / floor, the isolated view's, and the
largest isolated ratio outside the planted layer (doc/floors.md "A worked example" is the same on the CPU fixture).

    python scripts/deep_bug_evidence.py CHECKPOINT [--device cuda] [--dtype bfloat16] [--layer 17] [--out F.json]

Needs qwenlab, transformers and the float32 reference beside the model (three copies of the weights).
"""
import argparse
import json
import sys
import time

import torch

from qwenlab.activations import planted
from qwenlab.activations.floors import Gates
from qwenlab.activations.reference import load_reference
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks.nbutil import load_thresholds
from qwenlab.model.loader import load

PROMPTS = ["The quick brown fox jumps over the lazy dog while the band plays on.",
           "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()\n"]


def summary(d: ld.PromptDiff, layer: int) -> dict:
    ratios = {r["name"]: r["rel_l2"] / r["floor"] for r in d.result.rows if r["floor"]}
    iso = d.isolated
    others = iso.drop(index=[n for n in iso.index if n.startswith(f"layers.{layer}.")])
    worst_iso = iso["ratio"].idxmax()
    return {"accumulated_first_over_floor": d.result.first_divergence,
            "accumulated_max_ratio": max(ratios.values()), "accumulated_worst": max(ratios, key=ratios.get),
            "isolated_first_over_floor": ld.first_isolated(iso),
            "isolated_max_ratio": float(iso["ratio"].max()), "isolated_worst": worst_iso,
            "isolated_max_ratio_other_layers": float(others["ratio"].max()),
            "logits_noise_rel_l2": d.noise.tensors.get("logits")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layer", type=int, default=17)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--out", default="")
    a = p.parse_args()
    t0 = time.perf_counter()
    gates = Gates.from_thresholds(load_thresholds("", "03_layer_diffs"))
    ckpt = load(a.checkpoint, a.dtype, a.device)
    layers = ckpt.model.config.num_hidden_layers
    if not 0 <= a.layer < layers:
        print(f"--layer {a.layer}: the checkpoint has layers 0-{layers - 1}", file=sys.stderr)
        return 2
    ref = load_reference(a.checkpoint, getattr(torch, a.dtype), a.device)
    truth = load_reference(a.checkpoint, torch.float32, a.device)
    bugs = {"correct": lambda: None,
            f"rope_theta_x{a.factor:g}_in_layer_{a.layer}": lambda: planted.rope_theta_off_in_layer(ckpt.model, a.layer,
                                                                                                   a.factor),
            f"k_norm_skipped_in_layer_{a.layer}": lambda: planted.skip_norm(a.layer, "k")}
    out = {"checkpoint": a.checkpoint, "device": torch.cuda.get_device_name(0) if "cuda" in a.device else a.device,
           "dtype": a.dtype, "layers": layers, "layer": a.layer, "torch": torch.__version__, "runs": {}}
    for name, make in bugs.items():
        out["runs"][name] = []
        for prompt in PROMPTS:
            ids = ckpt.tokenizer.encode(prompt)
            d = ld.prompt_diff(ld.capture_prompt(ckpt.model, ref, truth, ids, prompt[:20], replace=make()), a.dtype,
                               gates)
            out["runs"][name].append({"tokens": len(ids), **summary(d, a.layer)})
        for s in out["runs"][name]:
            print(f"{name:32s} {s['tokens']:3d} tokens | accumulated: first over floor {s['accumulated_first_over_floor']}"
                  f", max {s['accumulated_max_ratio']:.2f}x ({s['accumulated_worst']}) | isolated: first "
                  f"{s['isolated_first_over_floor']}, max {s['isolated_max_ratio']:.2f}x ({s['isolated_worst']}); "
                  f"other layers max {s['isolated_max_ratio_other_layers']:.2f}x")
    out["seconds"] = time.perf_counter() - t0
    print(f"{out['seconds']:.1f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
