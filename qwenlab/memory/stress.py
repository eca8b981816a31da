"""Memory stress matrix: strategies x iterations of a scripted multi-turn chat, in one process or one fresh
process per iteration. Records each iteration's baseline (memory left after it, settled) and each turn's peak;
fails on a leak (baseline growing across iterations) or on any crash. `qwenlab stress` and notebook 05 run this.

Baseline: on CUDA the allocator's allocated bytes, on CPU the bytes of live torch tensors found by a gc walk
(both exact: live tensors only; RSS and USS are recorded beside it, for reading). Leak: per strategy, the median
baseline of the last iterations minus the baseline of the first iteration after warm-up, in MB (2^20 bytes),
against --leak-threshold-mb.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from qwenlab.arguments import COUNT, NON_NEGATIVE, bounded_float
from qwenlab.atomic import json_safe
from qwenlab.errors import QwenlabError, standalone_main
from qwenlab.generation.chat import STRATEGIES
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory.scripted_chat import MB, Policy, load_script
from qwenlab.memory.stress_matrix import DEFAULT_LEAK_MB, StressConfig, StressResult, run_iteration, run_matrix
from qwenlab.model.loader import load
from qwenlab.model.spec import LoadSpec, add_load_arguments

ON_OFF = {"on": True, "off": False}


def format_table(result: StressResult) -> str:
    cols = ["strategy", "iterations", "crashes", "baseline_first_mb", "baseline_last_mb", "growth_mb",
            "slope_mb_per_iter", "peak_turn_max_mb", "reserved_growth_mb", "verdict"]
    summary = result.summary[[c for c in cols if c in result.summary]]
    if result.turns is not None and not result.turns.empty:
        lat = result.turns.groupby("strategy")["latency_s"]
        last = result.turns[result.turns["turn"] == result.turns["turn"].max()].groupby("strategy")["latency_s"]
        summary = summary.assign(mean_turn_s=summary["strategy"].map(lat.mean()),
                                 last_turn_s=summary["strategy"].map(last.mean()))
    baseline = "CUDA allocated" if result.device.startswith("cuda") else "live tensor bytes"
    head = (f"stress: {result.device}, baseline = {baseline} after each iteration, MB = 2^20 bytes, "
            f"allocator: {result.allocator}, policy: kv {'prealloc' if result.config.preallocate else 'grown'}, "
            f"empty_cache {'on' if result.config.empty_cache else 'off'}")
    return head + "\n" + summary.to_string(index=False, float_format=lambda v: f"{v:.2f}")


def verdict_line(result: StressResult) -> str:
    head = f"VERDICT stress: {'PASS' if result.passed else 'FAIL'}"
    return head if result.passed else head + "\n  - " + "\n  - ".join(result.reasons)


def add_arguments(p: argparse.ArgumentParser):
    add_load_arguments(p)
    p.add_argument("--strategies", default="session,rebuild,replay", help="comma-separated subset")
    p.add_argument("--iterations", type=COUNT, default=10)
    p.add_argument("--turns", type=COUNT, default=6, help="user turns of data/chat_script.json to play (max 6)")
    p.add_argument("--max-new-tokens", type=COUNT, default=8)
    p.add_argument("--fresh-process", action="store_true", help="each iteration in a new python process")
    p.add_argument("--empty-cache", choices=ON_OFF, default="off", help="torch.cuda.empty_cache() after each turn")
    p.add_argument("--preallocate", choices=ON_OFF, default="on", help="KV cache preallocated (on) or grown per step")
    p.add_argument("--expandable-segments", choices=ON_OFF, default=None,
                   help="PYTORCH_CUDA_ALLOC_CONF expandable_segments (honoured with --fresh-process, or when "
                        "CUDA is not initialised yet)")
    p.add_argument("--max-len", type=COUNT, default=None, help="KV cache length (default: min(8192, model max))")
    p.add_argument("--leak-threshold-mb", type=bounded_float(0.0), default=None,
                   help=f"baseline growth that counts as a leak (default {DEFAULT_LEAK_MB['cpu']:g} on CPU, "
                        f"{DEFAULT_LEAK_MB['cuda']:g} on CUDA)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=1, help="iterations before the leak reference")
    p.add_argument("--script", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--one-iteration", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="session", help=argparse.SUPPRESS)
    p.add_argument("--iteration", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args) -> StressConfig:
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise QwenlabError(f"--strategies {args.strategies!r}: choose from {', '.join(STRATEGIES)}")
    return StressConfig(spec=LoadSpec.from_args(args), strategies=strategies,
                        iterations=args.iterations, turns=args.turns, max_new_tokens=args.max_new_tokens,
                        fresh_process=args.fresh_process, empty_cache=ON_OFF[args.empty_cache],
                        preallocate=ON_OFF[args.preallocate],
                        expandable_segments=ON_OFF.get(args.expandable_segments),
                        max_len=args.max_len, leak_threshold_mb=args.leak_threshold_mb, warmup=args.warmup,
                        script=args.script)


def one_iteration(cfg: StressConfig, strategy: str, iteration: int, on_turn=None) -> dict:
    """The child of --fresh-process: load, run one chat, print the record. A crash exits non-zero."""
    system, script = load_script(cfg.script)
    ckpt = load(cfg.spec)
    policy = Policy(strategy, cfg.preallocate, cfg.empty_cache, cfg.expandable_segments, cfg.max_len)
    record = run_iteration(ckpt, policy, script[:cfg.turns], SamplingParams(max_new_tokens=cfg.max_new_tokens),
                           iteration=iteration, system=system, on_turn=on_turn)
    if not record["ok"]:
        raise RuntimeError(record["error"])
    return record


def cmd_stress(args) -> int:
    cfg = config_from_args(args)
    if args.one_iteration:
        print(json.dumps(json_safe(one_iteration(cfg, args.strategy, args.iteration))))
        return 0

    def progress(r):
        state = "ok" if r["ok"] else f"CRASH {r['error']}"
        base = r.get("baseline_bytes", math.nan)
        print(f"  {r['strategy']:>7} #{r['iteration']:<3} baseline {base / MB:9.1f} MB  "
              f"{r['duration_s']:6.2f} s  {state}", file=sys.stderr, flush=True)

    result = run_matrix(cfg, progress=progress)
    payload = result.to_json()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1, allow_nan=False))
    if args.json:
        print(json.dumps(payload, allow_nan=False))
    else:
        print(format_table(result))
        print(verdict_line(result))
    return 0 if result.passed else 1


def register(subparsers):
    p = subparsers.add_parser("stress", help="memory stress matrix: strategies x iterations of a scripted chat; "
                                             "exit 1 on a leak or a crash")
    add_arguments(p)
    p.set_defaults(func=cmd_stress)


def main(argv=None) -> int:
    """`python -m qwenlab.memory.stress ...` (what --fresh-process children run): the same as `qwenlab stress ...`."""
    return standalone_main("stress", register, argv)


if __name__ == "__main__":
    sys.exit(main())
