"""Reading a tracker frame (memory/tracker.py): each turn's peak and end, phase deltas, fragmentation, and the
unit to plot bytes in."""
import pandas as pd

NAN = float("nan")


def turn_peaks(frame):
    f = frame[frame["turn"].notna()]
    if f.empty:
        return pd.DataFrame()
    host_peak = f["host_peak_rss"].where(f["host_peak_rss"].notna(), f["rss"])
    f = f.assign(host_peak=host_peak)
    g = f.groupby("turn", sort=True)
    out = pd.DataFrame({"peak_rss": g["host_peak"].max(), "peak_cuda_allocated": g["cuda_peak_allocated"].max(),
                        "peak_cuda_reserved": g["cuda_peak_reserved"].max()})
    end = f[f["phase"] == "turn_end"].groupby("turn").last()
    for c in ("rss", "uss", "cuda_allocated", "cuda_reserved", "cuda_device_used"):
        out[f"end_{c}"] = end[c] if c in end else NAN
    t0, t1 = g["t"].min(), g["t"].max()
    out["t_start"], out["t_end"] = t0, t1
    return out.reset_index()


def unit_for(max_bytes: float) -> tuple[float, str]:
    return (2 ** 30, "GiB") if max_bytes >= 4 * 2 ** 30 else (2 ** 20, "MiB")


def has_cuda_columns(frame) -> bool:
    return bool(frame["cuda_allocated"].notna().any())


def phase_delta(frame, phase: str, column: str) -> float:
    """column at the end of the (first) phase minus at its start: e.g. the bytes the load left resident."""
    rows = frame[frame["phase"] == phase]
    start, end = rows[rows["event"] == "start"], rows[rows["event"] == "end"]
    if start.empty or end.empty:
        return NAN
    return float(end[column].iloc[0] - start[column].iloc[0])


def fragmentation(frame):
    """reserved - allocated (cached but unused) and inactive split bytes per sample; empty on CPU."""
    if not has_cuda_columns(frame):
        return frame.iloc[0:0][["t", "phase"]]
    return frame.assign(cached_unused=frame["cuda_reserved"] - frame["cuda_allocated"])[
        ["t", "phase", "event", "turn", "step", "cached_unused", "cuda_inactive_split"]]

