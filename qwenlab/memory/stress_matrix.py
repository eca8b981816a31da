"""The stress matrix behind `qwenlab stress` (memory/stress.py defines its baseline and its leak): every strategy
for cfg.iterations scripted chats, in this process or one fresh process per iteration, then one summary row per
strategy and the reasons the run fails (a leak, a crash)."""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from qwenlab.atomic import json_safe
from qwenlab.errors import QwenlabError
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory.device import ALLOC_CONF_ENV, allocator_config, apply_allocator_config, live_tensor_bytes, settle
from qwenlab.memory.scripted_chat import MB, Policy, load_script, run_chat
from qwenlab.memory.tracker import MemoryTracker
from qwenlab.model.loader import load
from qwenlab.model.spec import LoadSpec
from qwenlab.paths import REPO_ROOT

DEFAULT_LEAK_MB = {"cpu": 32.0, "cuda": 8.0}


def baseline_sample(device) -> dict:
    settle(device)
    s = MemoryTracker(device, uss="all").sample(uss=True)
    cuda = not math.isnan(s["cuda_allocated"])
    return {"baseline_bytes": s["cuda_allocated"] if cuda else live_tensor_bytes("cpu"), "baseline_rss": s["rss"],
            "baseline_uss": s["uss"], "baseline_cuda_reserved": s["cuda_reserved"],
            "baseline_cuda_device_used": s["cuda_device_used"], "num_alloc_retries": s["cuda_num_alloc_retries"],
            "num_ooms": s["cuda_num_ooms"]}


def run_iteration(ckpt, policy: Policy, turns, params, *, iteration: int, system=None, on_turn=None) -> dict:
    """One chat, caught: a crash is recorded (ok False, error), never raised. Baseline taken after it."""
    t0 = time.perf_counter()
    record = {"strategy": policy.strategy, "iteration": iteration, "ok": True, "error": "",
              "device": str(ckpt.model.device)}
    rows = []
    try:
        tracker = MemoryTracker(ckpt.model.device, uss="off")
        rows, tracker = run_chat(ckpt, policy, turns, params, system=system, tracker=tracker, step_samples=False,
                                 on_turn=on_turn, iteration=iteration)
        del tracker
    except Exception as e:  # noqa: BLE001 - a crash is a result of the matrix, not an abort
        record |= {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    record["duration_s"] = time.perf_counter() - t0
    record |= baseline_sample(ckpt.model.device)
    record["peak_turn_bytes"] = max((r["peak_bytes"] for r in rows), default=float("nan"))
    record["turns"] = rows
    return record


@dataclass
class StressConfig:
    spec: LoadSpec = LoadSpec()
    strategies: tuple = ("session", "rebuild", "replay")
    iterations: int = 10
    turns: int = 6
    max_new_tokens: int = 8
    fresh_process: bool = False
    empty_cache: bool = False
    preallocate: bool = True
    expandable_segments: bool | None = None
    max_len: int | None = None
    leak_threshold_mb: float | None = None
    warmup: int = 1
    timeout_s: float = 900.0
    script: str | None = None
    child_module: str = "qwenlab.memory.stress"  # what a fresh process runs (`python -m`, --one-iteration)


@dataclass
class StressResult:
    config: StressConfig
    iterations: "object"  # DataFrame, one row per (strategy, iteration)
    turns: "object"  # DataFrame, one row per turn
    summary: "object"  # DataFrame, one row per strategy
    reasons: list = field(default_factory=list)
    device: str = ""
    allocator: str = ""

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict:
        return json_safe({"passed": self.passed, "reasons": self.reasons, "device": self.device,
                          "allocator": self.allocator, "config": asdict(self.config),
                          "summary": self.summary.to_dict("records"),
                          "iterations": self.iterations.to_dict("records"), "turns": self.turns.to_dict("records")})


def leak_summary(iterations, threshold_mb: float, warmup: int = 1):
    """One row per strategy: baseline after warm-up, median of the last iterations, growth, slope, crashes."""
    out = []
    for strategy, g in iterations.groupby("strategy", sort=False):
        ok = g[g["ok"]].sort_values("iteration")
        b = ok["baseline_bytes"].to_numpy(dtype=float) / MB
        row = {"strategy": strategy, "iterations": len(g), "crashes": int((~g["ok"]).sum())}
        if len(b):
            first = warmup if len(b) > warmup else 0
            tail = b[first:][-max(1, min(3, (len(b) - first) // 2)):]
            row |= {"baseline_first_mb": b[first], "baseline_last_mb": float(np.median(tail)),
                    "growth_mb": float(np.median(tail)) - b[first], "steady_mb": float(np.median(b[first:]))}
            xs = ok["iteration"].to_numpy(dtype=float)[first:]
            row["slope_mb_per_iter"] = float(np.polyfit(xs, b[first:], 1)[0]) if len(xs) >= 2 else 0.0
            res = ok["baseline_cuda_reserved"].to_numpy(dtype=float) / MB
            row["reserved_growth_mb"] = float(np.median(res[first:][-len(tail):]) - res[first])
            row["peak_turn_max_mb"] = float(np.nanmax(ok["peak_turn_bytes"].to_numpy(dtype=float)) / MB) \
                if ok["peak_turn_bytes"].notna().any() else float("nan")
        else:
            row |= {"baseline_first_mb": math.nan, "baseline_last_mb": math.nan, "growth_mb": math.nan,
                    "steady_mb": math.nan, "slope_mb_per_iter": math.nan, "reserved_growth_mb": math.nan,
                    "peak_turn_max_mb": math.nan}
        row["leak"] = bool(row["growth_mb"] > threshold_mb)
        row["verdict"] = "CRASH" if row["crashes"] else ("LEAK" if row["leak"] else ("pass" if len(b) else "n/a"))
        out.append(row)
    return pd.DataFrame(out)


def _one_iteration_cmd(cfg: StressConfig, strategy: str, iteration: int) -> list[str]:
    spec = cfg.spec
    cmd = [sys.executable, "-m", cfg.child_module, "--one-iteration", "--strategy", strategy,
           "--iteration", str(iteration), "--turns", str(cfg.turns), "--max-new-tokens", str(cfg.max_new_tokens),
           "--dtype", spec.dtype, "--empty-cache", "on" if cfg.empty_cache else "off",
           "--preallocate", "on" if cfg.preallocate else "off"]
    for flag, value in (("--model", spec.model), ("--device", spec.device), ("--max-len", cfg.max_len),
                        ("--script", cfg.script), ("--quant", spec.quant), ("--device-map", spec.device_map)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def _fresh_iteration(cfg: StressConfig, strategy: str, iteration: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if cfg.expandable_segments is not None:
        env[ALLOC_CONF_ENV] = allocator_config(cfg.expandable_segments)
    t0 = time.perf_counter()
    base = {"strategy": strategy, "iteration": iteration, "turns": []}
    try:
        proc = subprocess.run(_one_iteration_cmd(cfg, strategy, iteration), capture_output=True, text=True,
                              env=env, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return base | {"ok": False, "error": f"timeout after {cfg.timeout_s:.0f} s",
                       "duration_s": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return base | {"ok": False, "error": f"exit {proc.returncode}: {tail}", "duration_s": time.perf_counter() - t0}
    record = json.loads(lines[-1])
    record["duration_s"] = time.perf_counter() - t0
    return record


def run_matrix(cfg: StressConfig, ckpt=None, progress=None, on_turn=None) -> StressResult:
    """Runs every strategy cfg.iterations times (strategies outermost). ckpt: an already loaded checkpoint for
    in-process runs (the notebook passes its own); progress(record) is called after each iteration;
    on_turn(strategy, iteration, turn) after each turn of an in-process run."""
    system, script = load_script(cfg.script)
    if cfg.turns > len(script):
        raise QwenlabError(f"--turns {cfg.turns}: the chat script has {len(script)} turns")
    turns = script[:cfg.turns]
    if cfg.fresh_process:
        allocator = "fresh process per iteration" + ("" if cfg.expandable_segments is None else
                                                     f", {ALLOC_CONF_ENV}={allocator_config(cfg.expandable_segments)}")
        device = cfg.spec.device or "default"
    else:
        allocator = apply_allocator_config(cfg.expandable_segments)
        if ckpt is None:
            ckpt = load(cfg.spec)
        device = str(ckpt.model.device)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    records = []
    for strategy in cfg.strategies:
        policy = Policy(strategy, cfg.preallocate, cfg.empty_cache, cfg.expandable_segments, cfg.max_len)
        for i in range(cfg.iterations):
            if cfg.fresh_process:
                record = _fresh_iteration(cfg, strategy, i)
            else:
                hook = None if on_turn is None else (lambda turn, s=strategy, i=i: on_turn(s, i, turn))
                record = run_iteration(ckpt, policy, turns, params, iteration=i, system=system, on_turn=hook)
            records.append(record)
            if progress is not None:
                progress(record)
    if cfg.fresh_process:
        device = next((r["device"] for r in records if r.get("device")), device)
    turn_rows = [r for rec in records for r in rec.get("turns", [])]
    iterations = pd.DataFrame([{k: v for k, v in r.items() if k != "turns"} for r in records])
    for c in ("baseline_bytes", "baseline_rss", "baseline_uss", "baseline_cuda_reserved", "peak_turn_bytes"):
        if c not in iterations:
            iterations[c] = math.nan
    threshold = cfg.leak_threshold_mb
    if threshold is None:
        threshold = DEFAULT_LEAK_MB["cuda" if device.startswith("cuda") else "cpu"]
        cfg = replace(cfg, leak_threshold_mb=threshold)
    summary = leak_summary(iterations, threshold, cfg.warmup)
    reasons = []
    for row in summary.to_dict("records"):
        if row["crashes"]:
            errors = iterations[(iterations["strategy"] == row["strategy"]) & ~iterations["ok"]]["error"]
            reasons.append(f"{row['strategy']}: {row['crashes']} of {row['iterations']} iterations crashed "
                           f"({errors.iloc[0]})")
        if row["leak"]:
            reasons.append(f"{row['strategy']}: baseline grew {row['growth_mb']:.1f} MB after warm-up "
                           f"(threshold {threshold:g} MB): a leak")
    return StressResult(cfg, iterations, pd.DataFrame(turn_rows), summary, reasons, device, allocator)
