"""`qwenlab bench`: batch-1 greedy decode of qwenlab (graph and eager engines) beside HF transformers (dynamic
and static cache) on the same weights, in one process: tok/s, ms/token, weight GB/s and % of the bandwidth floor
(weight bytes / measured copy bandwidth), time to first token, prefill tok/s, peak allocated memory against
weights + KV cache, compile time and load time. A command that prints numbers, never a test that asserts them."""
import argparse
import json
import sys
from pathlib import Path

import torch

from qwenlab.activations.reference import load_reference, reference_generate
from qwenlab.arguments import COUNT
from qwenlab.atomic import json_safe
from qwenlab.bench.measure import (
    copy_bandwidth,
    device_facts,
    peak_allocated,
    read_bytes_per_token,
    read_files,
    timed,
    weight_bytes,
)
from qwenlab.generation.decode import generate
from qwenlab.generation.engine import ENGINES, Engine, graph_unavailable
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory.predict import kv_bytes_per_token
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.loader import load, resolve_device, weight_files
from qwenlab.model.spec import LoadSpec, add_load_arguments
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.quant.configs import read_quant_config
from qwenlab.sequences import first_difference

GiB = 2 ** 30


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, min(vocab, 150000), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_rate(step_s: list[float]) -> float:
    """Tokens per second over the steps that ran a forward (the last step only samples the final token)."""
    return (len(step_s) - 1) / sum(step_s[:-1]) if len(step_s) > 1 else float("nan")


@torch.inference_mode()
def qwenlab_rows(model, prompt, new_tokens, prefill_ids, engines, load_s) -> list[dict]:
    device, rows = model.device, []
    params = SamplingParams(max_new_tokens=new_tokens)
    eager = Engine(model, "eager")
    prefill_s = _prefill_seconds(lambda: model(torch.tensor(prefill_ids, device=device),
                                              cache=eager.new_cache(len(prefill_ids)), last_only=True), device)
    for name in engines:
        why = graph_unavailable(model) if name == "graph" else None
        if why:  # e.g. graph on a CPU: a row that says it did not run, not a second eager row
            rows.append({"impl": "qwenlab", "engine": name, "note": f"not run: {why}"})
            continue
        engine = eager if name == "eager" else Engine(model, name)
        margins = []
        warm = generate(model, prompt, params, stop_ids=(-1,), engine=engine, on_logits=lambda l: margins.append(
            float(torch.topk(l.float(), 2).values.diff().neg())))  # untimed run: the top-2 gap behind each token
        label = warm.engine if warm.engine == name else f"{warm.engine} (asked {name})"
        row = {"impl": "qwenlab", "engine": label, "note": warm.engine_note, "compile_s": warm.compile_s,
               "load_s": load_s, "prefill_tok_s": len(prefill_ids) / prefill_s, "ids": warm.ids,
               "top2_margins": margins}
        with peak_allocated(device, row):
            run = generate(model, prompt, params, stop_ids=(-1,), engine=engine)
        row |= {"decode_tok_s": decode_rate(run.step_s), "ttft_s": run.prefill_s + run.step_s[0],
                "timed_note": run.engine_note, "timed_same_tokens": run.ids == warm.ids}
        rows.append(row)
    return rows


def graph_vs_eager(rows: list[dict]) -> dict | None:
    """Where the graph engine's greedy tokens first part from the eager engine's, with both top-2 logit margins
    there: in bf16 a flip at a near-tie is rounding, a flip at a clear margin is a bug."""
    by_engine = {r["engine"]: r for r in rows if r["impl"] == "qwenlab" and "ids" in r}
    if "graph" not in by_engine or "eager" not in by_engine:
        return None
    graph, eager = by_engine["graph"], by_engine["eager"]
    at = first_difference(graph["ids"], eager["ids"])
    out = {"tokens": min(len(graph["ids"]), len(eager["ids"])), "first_parting": at}
    if at is not None:
        out |= {"graph_top2_margin": graph["top2_margins"][at], "eager_top2_margin": eager["top2_margins"][at]}
    return out


def nvfp4_over_dense(rows: list[dict], dense: str) -> dict | None:
    """Decode and prefill speed of the NVFP4 model over the dense one, per qwenlab engine, from the same run."""
    out = {}
    for row in rows:
        if row["impl"] != "qwenlab" or row["model"] != "nvfp4" or "decode_tok_s" not in row:
            continue
        base = next((r for r in rows if r["impl"] == "qwenlab" and r["model"] == dense and
                     r["engine"] == row["engine"] and "decode_tok_s" in r), None)
        if base is not None:
            out[row["engine"]] = {"decode": row["decode_tok_s"] / base["decode_tok_s"],
                                  "prefill": row["prefill_tok_s"] / base["prefill_tok_s"]}
    return out or None


def hf_rows(model_dir, dtype, device, prompt, new_tokens, prefill_ids, static: bool) -> list[dict]:
    hf, load_s = timed(lambda: load_reference(model_dir, dtype, device, attention="sdpa", allocator_warmup=True,
                                              experts=None), device)  # MoE: transformers' default experts kernel
    ids = torch.tensor([prefill_ids], device=device)
    prefill_s = _prefill_seconds(lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1), device)
    rows = []
    for cache, kwargs in [("dynamic", {})] + ([("static", {"cache_implementation": "static"})] if static else []):
        experts = getattr(hf.config, "_experts_implementation", None)
        row = {"impl": "transformers", "engine": f"generate, {cache} cache",
               "note": "sdpa attention" + (f", {experts} experts" if hf.config.model_type == "qwen3_moe" else ""),
               "load_s": load_s, "prefill_tok_s": len(prefill_ids) / prefill_s}
        try:
            def gen(n):
                return reference_generate(hf, prompt, n, min_new_tokens=n, **kwargs)
            _, first_s = timed(lambda: gen(new_tokens), device)  # the static cache compiles here
            _, one_s = timed(lambda: gen(1), device)
            with peak_allocated(device, row):
                _, all_s = timed(lambda: gen(new_tokens), device)
        except Exception as e:  # noqa: BLE001 - a path the installed transformers cannot run is reported, not fatal
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
            continue
        row |= {"decode_tok_s": (new_tokens - 1) / (all_s - one_s), "ttft_s": one_s}
        if cache == "static":  # its first call compiles the forward
            row["compile_s"] = max(0.0, first_s - all_s)
        rows.append(row)
    return rows


def _prefill_seconds(forward, device) -> float:
    timed(forward, device)
    return min(timed(forward, device)[1] for _ in range(2))


def run_bench(args) -> int:
    device = resolve_device(args.device)
    model_dir = resolve_model_dir(args.model)
    facts = device_facts(device)
    bandwidth = copy_bandwidth(device)
    read_files(sorted(set(weight_files(model_dir).values())))
    spec = LoadSpec.from_args(args).with_(model=model_dir, device=str(device))
    quantized = spec.quant in ("nvfp4", "nvfp4-w4a4")
    # --quant nvfp4 on a dense checkpoint: the dense model first, then the quantized one, in the same run
    specs = [spec.with_(quant=None), spec] if quantized and read_quant_config(model_dir) is None else [spec]
    rows, models, dtype, cfg = [], {}, None, None
    for each in specs:
        ckpt, load_s = timed(lambda: load(each), device)
        model, cfg = ckpt.model, ckpt.config
        label = "nvfp4" if model.quantization is not None else dtype_name(model.dtype)
        wbytes, rbytes = weight_bytes(model), read_bytes_per_token(model)  # the floor: what a step reads
        models[label] = {"weight_bytes": wbytes, "read_bytes_per_token": rbytes,
                         "floor_ms_per_token": rbytes / bandwidth * 1e3, "floor_tok_s": bandwidth / rbytes,
                         "quantization": model.quantization.summary() if model.quantization else None}
        prompt = random_ids(args.prompt_tokens, cfg.vocab_size, 0)
        prefill_ids = random_ids(args.prefill_tokens, cfg.vocab_size, 1)
        engines = [e.strip() for e in args.engines.split(",")]
        rows += [r | {"model": label} for r in qwenlab_rows(model, prompt, args.new_tokens, prefill_ids, engines,
                                                             load_s)]
        dtype = dtype or model.dtype
        del ckpt, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = next(iter(models))
    if args.hf != "off":
        rows += [r | {"model": first} for r in hf_rows(model_dir, dtype, device, prompt, args.new_tokens, prefill_ids,
                                                       static=args.hf == "all" or (args.hf == "auto" and
                                                                                  device.type == "cuda"))]
    wbytes = models[first]["weight_bytes"]
    budget = wbytes + kv_bytes_per_token(cfg, dtype) * (args.prompt_tokens + args.new_tokens)
    for row in rows:
        tok_s, floor_s = row.get("decode_tok_s", float("nan")), models[row["model"]]["floor_ms_per_token"] / 1e3
        row |= {"ms_per_token": 1e3 / tok_s, "weight_gb_s": models[row["model"]]["read_bytes_per_token"] * tok_s / 1e9,
                "pct_of_floor": 100 * tok_s * floor_s}
    result = {"facts": facts, "model": str(model_dir), "layers": cfg.num_hidden_layers, "dtype": dtype_name(dtype),
              "weight_bytes": wbytes, "read_bytes_per_token": models[first]["read_bytes_per_token"],
              "copy_bandwidth_gb_s": bandwidth / 1e9,
              "floor_ms_per_token": models[first]["floor_ms_per_token"], "floor_tok_s": models[first]["floor_tok_s"],
              "models": models, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "prefill_tokens": args.prefill_tokens, "budget_bytes": budget, "rows": rows,
              "graph_vs_eager": {label: graph_vs_eager([r for r in rows if r["model"] == label]) for label in models},
              "nvfp4_over_dense": nvfp4_over_dense(rows, first)}
    if args.out:
        Path(args.out).write_text(json.dumps(json_safe(result), indent=1))
    print(json.dumps(json_safe(result)) if args.json else format_table(result))
    return 0


def _weights(m: dict) -> str:
    """'weights X GB', and the bytes a step reads where fewer (a MoE model's experts, an untied embedding)."""
    read = m.get("read_bytes_per_token", m["weight_bytes"])
    return f"weights {m['weight_bytes'] / 1e9:.3f} GB" + (
        f", read per token {read / 1e9:.3f} GB" if read != m["weight_bytes"] else "")


def format_table(r: dict) -> str:
    f = r["facts"]
    versions = " · ".join(f"{k} {f[k]}" for k in ("torch", "transformers", "triton", "python") if k in f)
    where = (f"{f['name']} · driver {f['driver']} · CUDA {f['cuda']}" if "driver" in f
             else f"cpu ({f['threads']} threads)")
    lines = [f"qwenlab bench · {where} · {versions}",
             f"model {r['model']}: {r['layers']} layers, {r['dtype']}, {_weights(r)}; copy "
             f"bandwidth {r['copy_bandwidth_gb_s']:.0f} GB/s -> floor {r['floor_ms_per_token']:.2f} ms/token "
             f"({r['floor_tok_s']:.0f} tok/s)",
             f"batch 1, greedy, prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens; prefill of "
             f"{r['prefill_tokens']} tokens; budget = weights + KV for the context = {r['budget_bytes'] / GiB:.2f} GiB"]
    for label, m in r.get("models", {}).items():
        if label == "nvfp4":
            lines.append(f"nvfp4: {_weights(m)} -> floor {m['floor_ms_per_token']:.2f} "
                         f"ms/token ({m['floor_tok_s']:.0f} tok/s); {m['quantization']}")
    lines += ["",
             f"{'model':<8} {'impl':<13} {'engine':<25} {'tok/s':>7} {'ms/tok':>7} {'GB/s':>6} {'%floor':>6} "
             f"{'TTFT ms':>8} "
             f"{'prefill tok/s':>13} {'peak GiB':>8} {'compile s':>9} {'load s':>6}"]
    for row in r["rows"]:
        def num(key, fmt, scale=1.0):
            v = row.get(key)
            if isinstance(v, (int, float)) and v == v:
                return format(v * scale, fmt)
            return "-".rjust(len(format(0.0, fmt)))
        lines.append(f"{row.get('model', r['dtype']):<8} {row['impl']:<13} {row['engine']:<25} "
                     f"{num('decode_tok_s', '7.1f')} "
                     f"{num('ms_per_token', '7.2f')} {num('weight_gb_s', '6.0f')} {num('pct_of_floor', '6.1f')} "
                     f"{num('ttft_s', '8.1f', 1e3)} {num('prefill_tok_s', '13.0f')} "
                     f"{num('peak_allocated_bytes', '8.2f', 1 / GiB)} {num('compile_s', '9.1f')} "
                     f"{num('load_s', '6.1f')}")
    notes = [f"  {row.get('model', '')} {row['impl']} {row['engine']}: {row['note']}" for row in r["rows"]
             if row.get("note")]
    notes += [f"  {row.get('model', '')} {row['impl']} {row['engine']}: the timed run ({row.get('timed_note', '')}) "
              f"gave other tokens than the untimed step-by-step run" for row in r["rows"]
              if row.get("timed_same_tokens") is False]
    for engine, ratio in (r.get("nvfp4_over_dense") or {}).items():
        lines.append(f"nvfp4 / {r['dtype']} ({engine} engine): decode {ratio['decode']:.2f}x, prefill "
                     f"{ratio['prefill']:.2f}x")
    for label, parting in (r.get("graph_vs_eager") or {}).items():
        if parting:
            lines.append(f"{label} greedy graph vs eager over {parting['tokens']} tokens: " + (
                "identical" if parting["first_parting"] is None else
                f"first part at token {parting['first_parting']} (top-2 margin graph "
                f"{parting['graph_top2_margin']:.3g}, eager {parting['eager_top2_margin']:.3g})"))
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def add_arguments(p: argparse.ArgumentParser):
    add_load_arguments(p, device_map=False)
    p.add_argument("--prompt-tokens", type=COUNT, default=128)
    p.add_argument("--new-tokens", type=COUNT, default=256)
    p.add_argument("--prefill-tokens", type=COUNT, default=2048)
    p.add_argument("--engines", default="graph,eager", help=f"qwenlab engines to time, from {', '.join(ENGINES)}")
    p.add_argument("--hf", choices=("auto", "all", "dynamic", "off"), default="auto",
                   help="transformers paths: auto = dynamic cache, plus the static (compiled) cache on CUDA")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")


def register(subparsers):
    p = subparsers.add_parser("bench", help="decode/prefill speed, memory and load time vs HF transformers",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run_bench)


if __name__ == "__main__":
    sys.exit(print("use: qwenlab bench ...") or 2)
