"""Memory stress matrix: strategies x iterations of a scripted multi-turn chat, in one process or one fresh
process per iteration. Records each iteration's baseline (memory left after it, settled) and each turn's peak;
fails on a leak (baseline growing across iterations) or on any crash. `qwenlab stress` and notebook 05 run this.

Baseline: on CUDA the allocator's allocated bytes (exact: live tensors only), on CPU the process RSS (USS too,
for reading). Leak: per strategy, the median baseline of the last iterations minus the baseline of the first
iteration after warm-up, in MB (2^20 bytes), against --leak-threshold-mb.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT_PATH = REPO_ROOT / "data" / "chat_script.json"
MB = 2 ** 20
DEFAULT_LEAK_MB = {"cpu": 32.0, "cuda": 8.0}
ON_OFF = {"on": True, "off": False}
_PLANTED_LEAK: list = []  # the planted leak of the tests: keeps a tensor per turn alive, like a list of logits


def load_script(path=None) -> tuple[str | None, list[str]]:
    raw = json.loads(Path(path or SCRIPT_PATH).read_text())
    return raw.get("system"), list(raw["turns"])


def clear_planted_leak():
    _PLANTED_LEAK.clear()


def plant_leak(mb: float, device):
    import torch

    _PLANTED_LEAK.append(torch.ones(int(mb * MB) // 4, dtype=torch.float32, device=device))


@dataclass
class Policy:
    """What the user switches: conversation strategy, KV cache layout, emptying the allocator cache per turn,
    and the allocator's expandable_segments (None = leave PYTORCH_CUDA_ALLOC_CONF alone)."""
    strategy: str = "session"
    preallocate: bool = True
    empty_cache: bool = False
    expandable_segments: bool | None = None
    max_len: int | None = None

    def label(self) -> str:
        on = {True: "on", False: "off"}
        s = f"{self.strategy}, kv {'prealloc' if self.preallocate else 'grown'}, empty_cache {on[self.empty_cache]}"
        return s if self.expandable_segments is None else s + f", expandable {on[self.expandable_segments]}"


def run_chat(ckpt, policy: Policy, turns: list[str], params, *, system=None, tracker=None,
             step_samples: bool = True, leak_mb: float = 0.0, crash_turn: int | None = None, **labels):
    """One scripted chat under `policy`, every turn tracked. Returns (per-turn rows, tracker)."""
    from .chat import ChatSession
    from .memory import MemoryTracker, empty_cache

    tracker = tracker or MemoryTracker(ckpt.model.device)
    device = ckpt.model.device
    start = len(tracker.rows)
    session = ChatSession(ckpt.model, ckpt.tokenizer, system=system, strategy=policy.strategy,
                          max_len=policy.max_len, preallocate=policy.preallocate)
    after = (lambda: empty_cache(device)) if policy.empty_cache else None
    rows = []
    for i, user in enumerate(turns):
        if crash_turn is not None and i == crash_turn:
            raise RuntimeError(f"planted crash at turn {i}")
        t0 = time.perf_counter()
        with tracker.labelled(strategy=policy.strategy, **labels):
            turn = tracker.track_send(session, user, params, turn=i, after_turn=after, step_samples=step_samples)
        latency = time.perf_counter() - t0
        if leak_mb:
            plant_leak(leak_mb, device)
        gen = turn.generation
        rows.append({"strategy": policy.strategy, **labels, "turn": i, "prefill_tokens": turn.prefill_tokens,
                     "tokens_computed": tokens_computed(policy.strategy, turn.prefill_tokens, len(gen.prompt_ids),
                                                       len(gen.ids)),
                     "reused_tokens": turn.reused_tokens, "new_tokens": len(gen.ids),
                     "context_tokens": len(gen.prompt_ids) + len(gen.ids), "latency_s": latency,
                     "prefill_s": gen.prefill_s, "decode_tok_s": gen.decode_tok_s, "stop_reason": gen.stop_reason,
                     "kv_cache_bytes": session.cache.nbytes() if session.cache is not None else 0})
    _add_turn_peaks(rows, tracker, start)
    return rows, tracker


def tokens_computed(strategy: str, prefill_tokens: int, prompt_tokens: int, new_tokens: int) -> int:
    """Positions that went through the model in one turn: with a cache the prefill plus one per further token;
    replay recomputes the whole sequence for every token (prompt, prompt + 1, ...)."""
    if strategy == "replay":
        return sum(prompt_tokens + k for k in range(max(new_tokens, 1)))
    return prefill_tokens + max(new_tokens - 1, 0)


def _add_turn_peaks(rows, tracker, start):
    from .memory import turn_peaks

    if len(tracker.rows) == start:
        return
    peaks = turn_peaks(tracker.frame().iloc[start:]).set_index("turn")
    for row in rows:
        p = peaks.loc[row["turn"]]
        cuda = not math.isnan(p["peak_cuda_allocated"])
        row["peak_bytes"] = p["peak_cuda_allocated"] if cuda else p["peak_rss"]
        row["peak_reserved_bytes"] = p["peak_cuda_reserved"]
        row["end_bytes"] = p["end_cuda_allocated"] if cuda else p["end_rss"]
        row["end_reserved_bytes"] = p["end_cuda_reserved"]


def baseline_sample(device) -> dict:
    from .memory import MemoryTracker, settle

    settle(device)
    s = MemoryTracker(device, uss="all").sample(uss=True)
    cuda = not math.isnan(s["cuda_allocated"])
    return {"baseline_bytes": s["cuda_allocated"] if cuda else s["rss"], "baseline_rss": s["rss"],
            "baseline_uss": s["uss"], "baseline_cuda_reserved": s["cuda_reserved"],
            "baseline_cuda_device_used": s["cuda_device_used"], "num_alloc_retries": s["cuda_num_alloc_retries"],
            "num_ooms": s["cuda_num_ooms"]}


def run_iteration(ckpt, policy: Policy, turns, params, *, iteration: int, system=None, leak_mb: float = 0.0,
                  crash: bool = False) -> dict:
    """One chat, caught: a crash is recorded (ok False, error), never raised. Baseline taken after it."""
    from .memory import MemoryTracker

    t0 = time.perf_counter()
    record = {"strategy": policy.strategy, "iteration": iteration, "ok": True, "error": "",
              "device": str(ckpt.model.device)}
    rows = []
    try:
        tracker = MemoryTracker(ckpt.model.device, uss="off")
        rows, tracker = run_chat(ckpt, policy, turns, params, system=system, tracker=tracker, step_samples=False,
                                 leak_mb=leak_mb, crash_turn=1 if crash else None, iteration=iteration)
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
    model_dir: str | None = None
    device: str | None = None
    dtype: str = "auto"
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
    leak_mb: float = 0.0  # planted leak per turn (tests)
    crash_iteration: int | None = None  # planted crash (tests)
    timeout_s: float = 900.0
    script: str | None = None


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
        from .nbutil import json_safe

        return json_safe({"passed": self.passed, "reasons": self.reasons, "device": self.device,
                          "allocator": self.allocator, "config": asdict(self.config),
                          "summary": self.summary.to_dict("records"),
                          "iterations": self.iterations.to_dict("records"), "turns": self.turns.to_dict("records")})


def leak_summary(iterations, threshold_mb: float, warmup: int = 1):
    """One row per strategy: baseline after warm-up, median of the last iterations, growth, slope, crashes."""
    import numpy as np
    import pandas as pd

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
    cmd = [sys.executable, "-m", "qwenlab.stress", "--one-iteration", "--strategy", strategy,
           "--iteration", str(iteration), "--turns", str(cfg.turns), "--max-new-tokens", str(cfg.max_new_tokens),
           "--dtype", cfg.dtype, "--empty-cache", "on" if cfg.empty_cache else "off",
           "--preallocate", "on" if cfg.preallocate else "off"]
    for flag, value in (("--model", cfg.model_dir), ("--device", cfg.device), ("--max-len", cfg.max_len),
                        ("--script", cfg.script)):
        if value is not None:
            cmd += [flag, str(value)]
    if cfg.leak_mb:
        cmd += ["--plant-leak-mb", str(cfg.leak_mb)]
    if cfg.crash_iteration == iteration:
        cmd += ["--plant-crash-iteration", str(iteration)]
    return cmd


def _fresh_iteration(cfg: StressConfig, strategy: str, iteration: int) -> dict:
    from .memory import ALLOC_CONF_ENV, allocator_config

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


def run_matrix(cfg: StressConfig, ckpt=None, progress=None) -> StressResult:
    """Runs every strategy cfg.iterations times (strategies outermost). ckpt: an already loaded checkpoint for
    in-process runs (the notebook passes its own); progress(record) is called after each iteration."""
    import pandas as pd

    from .memory import apply_allocator_config
    from .sampling import SamplingParams

    system, script = load_script(cfg.script)
    if cfg.turns > len(script):
        from .errors import QwenlabError
        raise QwenlabError(f"--turns {cfg.turns}: the chat script has {len(script)} turns")
    turns = script[:cfg.turns]
    if cfg.fresh_process:
        from .memory import ALLOC_CONF_ENV, allocator_config

        allocator = "fresh process per iteration" + ("" if cfg.expandable_segments is None else
                                                     f", {ALLOC_CONF_ENV}={allocator_config(cfg.expandable_segments)}")
        device = cfg.device or "default"
    else:
        allocator = apply_allocator_config(cfg.expandable_segments)
        if ckpt is None:
            from .loader import load
            from .tiny import ensure_tiny
            ckpt = load(cfg.model_dir or ensure_tiny(), cfg.dtype, cfg.device)
        device = str(ckpt.model.device)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens)
    records = []
    for strategy in cfg.strategies:
        policy = Policy(strategy, cfg.preallocate, cfg.empty_cache, cfg.expandable_segments, cfg.max_len)
        for i in range(cfg.iterations):
            if cfg.fresh_process:
                record = _fresh_iteration(cfg, strategy, i)
            else:
                record = run_iteration(ckpt, policy, turns, params, iteration=i, system=system, leak_mb=cfg.leak_mb,
                                       crash=cfg.crash_iteration == i)
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


def format_table(result: StressResult) -> str:
    cols = ["strategy", "iterations", "crashes", "baseline_first_mb", "baseline_last_mb", "growth_mb",
            "slope_mb_per_iter", "peak_turn_max_mb", "reserved_growth_mb", "verdict"]
    summary = result.summary[[c for c in cols if c in result.summary]]
    if result.turns is not None and not result.turns.empty:
        lat = result.turns.groupby("strategy")["latency_s"]
        last = result.turns[result.turns["turn"] == result.turns["turn"].max()].groupby("strategy")["latency_s"]
        summary = summary.assign(mean_turn_s=summary["strategy"].map(lat.mean()),
                                 last_turn_s=summary["strategy"].map(last.mean()))
    baseline = "CUDA allocated" if result.device.startswith("cuda") else "RSS"
    head = (f"stress: {result.device}, baseline = {baseline} after each iteration, MB = 2^20 bytes, "
            f"allocator: {result.allocator}, policy: kv {'prealloc' if result.config.preallocate else 'grown'}, "
            f"empty_cache {'on' if result.config.empty_cache else 'off'}")
    return head + "\n" + summary.to_string(index=False, float_format=lambda v: f"{v:.2f}")


def verdict_line(result: StressResult) -> str:
    head = f"VERDICT stress: {'PASS' if result.passed else 'FAIL'}"
    return head if result.passed else head + "\n  - " + "\n  - ".join(result.reasons)


def compare_empty_cache(ckpt, turns, params, *, system=None, strategy: str = "rebuild", preallocate: bool = True):
    """The same chat with the allocator cache emptied after each turn and without. 'rebuild' churns the most
    (a fresh KV cache every turn), so the allocator's cached blocks show the clearest."""
    import pandas as pd

    from .memory import MemoryTracker

    rows = []
    for on in (False, True):
        r, _ = run_chat(ckpt, Policy(strategy, preallocate, on), turns, params, system=system, step_samples=False,
                        tracker=MemoryTracker(ckpt.model.device, uss="off"), empty_cache="on" if on else "off")
        rows += r
    return pd.DataFrame(rows)


def compare_strategies(ckpt, strategies, turns, params, *, system=None, preallocate: bool = True,
                       empty_cache: bool = False):
    """Per-turn latency, prefill tokens and memory of one scripted chat per strategy. Sampled at phase boundaries
    only, without USS, so the tracker adds next to nothing to the latencies; peaks come from the reset counters."""
    import pandas as pd

    from .memory import MemoryTracker

    rows = []
    for strategy in strategies:
        r, _ = run_chat(ckpt, Policy(strategy, preallocate, empty_cache), turns, params, system=system,
                        tracker=MemoryTracker(ckpt.model.device, uss="off"), step_samples=False)
        rows += r
    return pd.DataFrame(rows)


def _unit(values) -> tuple[float, str]:
    from .memory import unit_for

    return unit_for(max(float(v) for v in values if v == v) if any(v == v for v in values) else 0.0)


def _min_span(ax, values, span: float):
    """Keeps a memory axis at least `span` tall so sub-MiB noise does not look like a trend."""
    lo, hi = min(values), max(values)
    if hi - lo < span:
        mid = (hi + lo) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)


def plot_empty_cache(frame, cuda: bool):
    """Turn-end memory with and without empty_cache: reserved (and allocated, dotted) on CUDA, RSS on CPU."""
    import matplotlib.pyplot as plt

    col = "end_reserved_bytes" if cuda else "end_bytes"
    div, unit = _unit(list(frame[col]) + list(frame["peak_bytes"]))
    fig, ax = plt.subplots(figsize=(6, 3))
    for (policy, f), color in zip(frame.groupby("empty_cache"), ("tab:red", "tab:green")):
        ax.plot(f["turn"], f[col] / div, marker="o", color=color,
                label=f"empty_cache {policy}: {'reserved' if cuda else 'RSS'} at turn end")
        if cuda:
            ax.plot(f["turn"], f["end_bytes"] / div, ls=":", color=color, label=f"empty_cache {policy}: allocated")
    _min_span(ax, list(frame[col] / div) + (list(frame["end_bytes"] / div) if cuda else []), 16 * MB / div)
    ax.set_xlabel("turn")
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)
    ax.set_title("empty_cache after each turn: on vs off" + ("" if cuda else " (CPU: a no-op, any gap is noise)"),
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_strategies(frame):
    """Three panels per turn: latency, tokens prefilled, peak memory (CUDA allocated or host VmHWM)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    div, unit = _unit(list(frame["peak_bytes"]))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for strategy, f in frame.groupby("strategy", sort=False):
        axes[0].plot(f["turn"], f["latency_s"], marker="o", label=strategy)
        axes[1].plot(f["turn"], f["tokens_computed"], marker="o", label=strategy)
        axes[2].plot(f["turn"], f["peak_bytes"] / div, marker="o", label=strategy)
    _min_span(axes[2], list(frame["peak_bytes"] / div), 16 * MB / div)
    for ax, label in zip(axes, ("turn latency (s)", "tokens through the model", f"peak ({unit})")):
        ax.set_xlabel("turn")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_baselines(result: StressResult):
    """Baseline after each iteration per strategy: flat = no leak; a staircase = something kept alive."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    it = result.iterations
    fig, ax = plt.subplots(figsize=(6, 3))
    for strategy, f in it.groupby("strategy", sort=False):
        ok = f[f["ok"]]
        ax.plot(ok["iteration"], ok["baseline_bytes"] / MB, marker="o", label=strategy)
        bad = f[~f["ok"]]
        if not bad.empty:
            ax.scatter(bad["iteration"], [ok["baseline_bytes"].max() / MB] * len(bad), marker="x", color="red")
    ax.axvline(result.config.warmup - 0.5, color="0.6", ls=":", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("MB (2^20 bytes)")
    what = "CUDA allocated" if result.device.startswith("cuda") else "RSS"
    ax.set_title(f"baseline ({what}) after each iteration; warm-up left of the dotted line", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def leak_threshold(thresholds: dict, device) -> float:
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return float(thresholds.get(f"leak_growth_mb_max_{kind}", DEFAULT_LEAK_MB[kind]))


def notebook_verdict(thresholds: dict, *, device, weights, kv, timeline, empty_cache_frame, strategies_frame,
                     stress: StressResult) -> tuple[dict, list[str]]:
    """Notebook 05's metrics and the thresholds they exceed (an empty list passes)."""
    from .memory import fragmentation, turn_peaks
    from .nbutil import check_max

    cuda = str(device).startswith("cuda")
    reasons: list[str] = []
    m: dict = {"device": str(device)}
    for row in weights.to_dict("records"):
        key = row["quantity"].split(": ")[1].replace(" ", "_").lower()
        m[f"weights_{key}_predicted"], m[f"weights_{key}_measured"] = row["predicted_bytes"], row["measured_bytes"]
        m[f"weights_{key}_rel_error"] = check_max(reasons, f"weights ({row['quantity']}) rel error",
                                                  row["rel_error"], thresholds["weights_rel_error_max"])
    m["kv_rel_error"] = check_max(reasons, "KV cache nbytes vs predicted, max rel error",
                                      float(kv["rel_error"].max()), thresholds["kv_rel_error_max"])
    if cuda:
        prealloc, grown = kv[kv["layout"] == "preallocated"], kv[kv["layout"] == "grown"]
        m["kv_cuda_rel_error"] = check_max(reasons, "preallocated KV cache: CUDA allocated delta vs predicted, max rel error",
                                           float(prealloc["cuda_rel_error"].max()), thresholds["kv_rel_error_max"])
        m["kv_cuda_grown_overhead"] = check_max(reasons, "grown KV cache: CUDA allocated delta over predicted, max",
                                                float(grown["cuda_rel_error"].max()),
                                                thresholds["kv_grown_overhead_max"])
        m["workspace_ratio"] = check_max(reasons, "prefill workspace measured / predicted, max",
                                             float(kv["workspace_ratio"].max()), thresholds["workspace_ratio_max"])
    peaks = turn_peaks(timeline)
    key = "peak_cuda_allocated" if cuda else "peak_rss"
    m["timeline_peak_turn_max_bytes"] = float(peaks[key].max())
    end = peaks["end_cuda_reserved" if cuda else "end_rss"]
    m["timeline_turn_end_swing_bytes"] = float(end.max() - end.min())
    frag = fragmentation(timeline)
    m["fragmentation_max_bytes"] = float(frag["cached_unused"].max()) if not frag.empty else None
    m["inactive_split_max_bytes"] = float(frag["cuda_inactive_split"].max()) if not frag.empty else None
    if cuda:
        m["num_alloc_retries"] = float(timeline["cuda_num_alloc_retries"].max())
        m["num_ooms"] = check_max(reasons, "CUDA OOMs during the timeline", float(timeline["cuda_num_ooms"].max()),
                                  thresholds.get("num_ooms_max", 0))
    col = "end_reserved_bytes" if cuda else "end_bytes"
    for policy, f in empty_cache_frame.groupby("empty_cache"):
        m[f"empty_cache_{policy}_turn_end_mean_bytes"] = float(f[col].mean())
        m[f"empty_cache_{policy}_peak_max_bytes"] = float(f["peak_bytes"].max())
    for strategy, f in strategies_frame.groupby("strategy"):
        m[f"{strategy}_latency_mean_s"] = float(f["latency_s"].mean())
        m[f"{strategy}_latency_last_s"] = float(f["latency_s"].iloc[-1])
        m[f"{strategy}_prefill_tokens_total"] = int(f["prefill_tokens"].sum())
        m[f"{strategy}_tokens_computed_total"] = int(f["tokens_computed"].sum())
        m[f"{strategy}_peak_max_bytes"] = float(f["peak_bytes"].max())
    limit = stress.config.leak_threshold_mb
    for row in stress.summary.to_dict("records"):
        m[f"stress_{row['strategy']}_growth_mb"] = row["growth_mb"]
        m[f"stress_{row['strategy']}_steady_mb"] = row["steady_mb"]
        m[f"stress_{row['strategy']}_peak_turn_max_mb"] = row["peak_turn_max_mb"]
        check_max(reasons, f"stress {row['strategy']}: baseline growth after warm-up (MB)", row["growth_mb"], limit)
    m["stress_iterations"] = stress.config.iterations
    m["stress_crashes"] = check_max(reasons, "stress: crashed iterations", int(stress.summary["crashes"].sum()),
                                    thresholds.get("crashes_max", 0))
    m["stress_leak_threshold_mb"] = limit
    return m, reasons


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny fixture)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default)")
    p.add_argument("--strategies", default="session,rebuild,replay", help="comma-separated subset")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--turns", type=int, default=6, help="user turns of data/chat_script.json to play (max 6)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--fresh-process", action="store_true", help="each iteration in a new python process")
    p.add_argument("--empty-cache", choices=ON_OFF, default="off", help="torch.cuda.empty_cache() after each turn")
    p.add_argument("--preallocate", choices=ON_OFF, default="on", help="KV cache preallocated (on) or grown per step")
    p.add_argument("--expandable-segments", choices=ON_OFF, default=None,
                   help="PYTORCH_CUDA_ALLOC_CONF expandable_segments (honoured with --fresh-process, or when "
                        "CUDA is not initialised yet)")
    p.add_argument("--max-len", type=int, default=None, help="KV cache length (default: min(8192, model max))")
    p.add_argument("--leak-threshold-mb", type=float, default=None,
                   help=f"baseline growth that counts as a leak (default {DEFAULT_LEAK_MB['cpu']:g} on CPU, "
                        f"{DEFAULT_LEAK_MB['cuda']:g} on CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="iterations before the leak reference")
    p.add_argument("--script", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    p.add_argument("--plant-leak-mb", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--plant-crash-iteration", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--one-iteration", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="session", help=argparse.SUPPRESS)
    p.add_argument("--iteration", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args) -> StressConfig:
    from .chat import STRATEGIES
    from .errors import QwenlabError

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise QwenlabError(f"--strategies {args.strategies!r}: choose from {', '.join(STRATEGIES)}")
    if args.iterations < 1 or args.turns < 1:
        raise QwenlabError("--iterations and --turns must be >= 1")
    return StressConfig(model_dir=args.model, device=args.device, dtype=args.dtype, strategies=strategies,
                        iterations=args.iterations, turns=args.turns, max_new_tokens=args.max_new_tokens,
                        fresh_process=args.fresh_process, empty_cache=ON_OFF[args.empty_cache],
                        preallocate=ON_OFF[args.preallocate],
                        expandable_segments=ON_OFF.get(args.expandable_segments),
                        max_len=args.max_len, leak_threshold_mb=args.leak_threshold_mb, warmup=args.warmup,
                        leak_mb=args.plant_leak_mb, crash_iteration=args.plant_crash_iteration, script=args.script)


def one_iteration(cfg: StressConfig, strategy: str, iteration: int) -> dict:
    """The child of --fresh-process: load, run one chat, print the record. A crash exits non-zero."""
    from .loader import load
    from .sampling import SamplingParams
    from .tiny import ensure_tiny

    system, script = load_script(cfg.script)
    ckpt = load(cfg.model_dir or ensure_tiny(), cfg.dtype, cfg.device)
    if cfg.crash_iteration == iteration:
        raise RuntimeError(f"planted crash in iteration {iteration}")
    policy = Policy(strategy, cfg.preallocate, cfg.empty_cache, cfg.expandable_segments, cfg.max_len)
    record = run_iteration(ckpt, policy, script[:cfg.turns], SamplingParams(max_new_tokens=cfg.max_new_tokens),
                           iteration=iteration, system=system, leak_mb=cfg.leak_mb)
    if not record["ok"]:
        raise RuntimeError(record["error"])
    return record


def cmd_stress(args) -> int:
    from .nbutil import json_safe

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
    from .errors import QwenlabError

    parser = argparse.ArgumentParser(prog="python -m qwenlab.stress", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_stress(args)
    except QwenlabError as e:
        print(f"qwenlab stress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
