"""Notebook 05's comparisons (one chat with empty_cache off and on, the strategies side by side), its leak
threshold and its verdict."""
import pandas as pd

from qwenlab.checks.nbutil import check_max
from qwenlab.memory.frame import fragmentation, turn_peaks
from qwenlab.memory.scripted_chat import Policy, run_chat
from qwenlab.memory.stress_matrix import DEFAULT_LEAK_MB, StressResult
from qwenlab.memory.tracker import MemoryTracker


def compare_empty_cache(ckpt, turns, params, *, system=None, strategy: str = "rebuild", preallocate: bool = True):
    """The same chat with the allocator cache emptied after each turn and without. 'rebuild' churns the most
    (a fresh KV cache every turn), so the allocator's cached blocks show the clearest."""
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
    rows = []
    for strategy in strategies:
        r, _ = run_chat(ckpt, Policy(strategy, preallocate, empty_cache), turns, params, system=system,
                        tracker=MemoryTracker(ckpt.model.device, uss="off"), step_samples=False)
        rows += r
    return pd.DataFrame(rows)


def leak_threshold(thresholds: dict, device) -> float:
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return float(thresholds.get(f"leak_growth_mb_max_{kind}", DEFAULT_LEAK_MB[kind]))


def verdict(thresholds: dict, *, device, weights, kv, timeline, empty_cache_frame, strategies_frame,
            stress: StressResult) -> tuple[dict, list[str]]:
    """Notebook 05's metrics and the thresholds they exceed (an empty list passes)."""
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
        m["kv_cuda_rel_error"] = check_max(reasons,
                                           "preallocated KV cache: CUDA allocated delta vs predicted, max rel error",
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
