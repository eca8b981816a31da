"""Notebook 05's figures: the tracker's timeline and fragmentation, the turn-end memory with empty_cache off and
on, the strategies per turn, the stress baselines per iteration."""
from qwenlab.memory.frame import fragmentation, has_cuda_columns, turn_peaks, unit_for
from qwenlab.memory.scripted_chat import MB
from qwenlab.memory.stress_matrix import StressResult

SHADES = {"load": "0.6", "prefill": "tab:orange", "decode": "tab:blue"}


def plot_timeline(frame, spans, title: str = ""):
    """Allocated vs reserved (and device used) on CUDA, RSS/USS on CPU, phases shaded, each turn's peak marked."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cuda = has_cuda_columns(frame)
    cols = (("cuda_allocated", "allocated"), ("cuda_reserved", "reserved"),
            ("cuda_device_used", "device used (nvidia-smi)")) if cuda else (("rss", "RSS"), ("uss", "USS"))
    div, unit = unit_for(max(frame[c].max() for c, _ in cols))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for s in spans.itertuples():
        ax.axvspan(s.t0, s.t1, color=SHADES.get(s.phase, "0.9"), alpha=0.15, lw=0)
    for c, label in cols:
        f = frame[frame[c].notna()]
        ax.plot(f["t"], f[c] / div, label=label, marker="." if c == "uss" else None, lw=1.2)
    peaks = turn_peaks(frame)
    if not peaks.empty:
        key = "peak_cuda_allocated" if cuda else "peak_rss"
        ax.scatter(peaks["t_end"], peaks[key] / div, marker="v", color="crimson", zorder=3,
                   label="turn peak (allocated)" if cuda else "turn peak (VmHWM)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=SHADES[p], alpha=0.3, label=p) for p in SHADES if p in set(spans.get("phase", []))]
    ax.legend(handles=handles, fontsize=7, loc="lower right", ncol=2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(unit)
    ax.set_title(title or ("CUDA allocator: allocated vs reserved" if cuda else
                           "host memory (CPU run: RSS / USS, no CUDA allocator)"), fontsize=9)
    fig.tight_layout()
    return fig


def plot_fragmentation(frame, title: str = ""):
    """reserved - allocated and inactive split bytes over time (CUDA only; None on CPU)."""
    import matplotlib.pyplot as plt

    frag = fragmentation(frame)
    if frag.empty:
        return None
    div, unit = unit_for(frag["cached_unused"].max())
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.plot(frag["t"], frag["cached_unused"] / div, label="reserved - allocated (cached, unused)")
    ax.plot(frag["t"], frag["cuda_inactive_split"] / div, label="inactive split (fragments)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)
    ax.set_title(title or "what the caching allocator holds beyond live tensors", fontsize=9)
    fig.tight_layout()
    return fig


def _unit(values) -> tuple[float, str]:
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


STRATEGY_STYLES = {"session": {"marker": "o", "ls": "-", "ms": 9, "mfc": "none", "color": "tab:blue"},
                   "rebuild": {"marker": "s", "ls": "--", "ms": 6, "color": "tab:purple"},
                   "replay": {"marker": "^", "ls": ":", "ms": 4, "color": "tab:red"}}
OTHER_STYLES = ({"marker": "D", "ls": "-.", "ms": 5, "color": "tab:green"},
                {"marker": "v", "ls": (0, (1, 3)), "ms": 5, "color": "tab:brown"})


def strategy_styles(strategies) -> dict:
    """A distinct marker, line style and colour per strategy, markers from large and hollow to small and filled:
    where strategies coincide every one of them stays visible."""
    others = iter(OTHER_STYLES * len(strategies))
    return {s: STRATEGY_STYLES.get(s) or next(others) for s in strategies}


def coincide(frame, column: str, tolerance: float) -> bool:
    """Every strategy has the same value (within `tolerance`) at every turn."""
    per_turn = frame.pivot_table(index="turn", columns="strategy", values=column)
    return len(per_turn.columns) > 1 and bool(((per_turn.max(axis=1) - per_turn.min(axis=1)) <= tolerance).all())


def plot_strategies(frame):
    """Three panels per turn: latency, tokens prefilled, peak memory (CUDA allocated or host VmHWM). Strategies are
    dodged slightly along x and drawn with distinct markers and line styles; a panel where they coincide says so."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cuda = "peak_reserved_bytes" in frame and bool(frame["peak_reserved_bytes"].notna().any())
    div, unit = _unit(list(frame["peak_bytes"]))
    strategies = list(dict.fromkeys(frame["strategy"]))
    styles = strategy_styles(strategies)
    panels = (("latency_s", 1.0, "turn latency (s)"), ("tokens_computed", 1.0, "tokens through the model"),
              ("peak_bytes", div, f"peak {'CUDA allocated' if cuda else 'host VmHWM'} ({unit})"))
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.4))
    for k, strategy in enumerate(strategies):
        f = frame[frame["strategy"] == strategy]
        x = f["turn"] + 0.08 * (k - (len(strategies) - 1) / 2)
        for ax, (column, scale, _) in zip(axes, panels):
            ax.plot(x, f[column] / scale, label=strategy, lw=1.2, **styles[strategy])
    _min_span(axes[2], list(frame["peak_bytes"] / div), 16 * MB / div)
    for ax, (column, scale, label) in zip(axes, panels):
        ax.set_xlabel("turn")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
        span = float(frame[column].abs().max() or 1.0)
        if coincide(frame, column, 1e-3 * span):
            ax.text(0.5, 0.04, f"all {len(strategies)} strategies coincide (within 0.1%)", transform=ax.transAxes,
                    ha="center", va="bottom", fontsize=7, color="0.3")
    axes[0].legend(fontsize=7)
    fig.suptitle("the same scripted chat per strategy; latency = wall time of one whole turn "
                 "(chat template, prefill, decode of the reply)", fontsize=8, color="0.25")
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


def plot_kv(frame, per_token: int, title: str = ""):
    """Predicted KV bytes (a line: per_token x length) against what each cache measured."""
    import matplotlib.pyplot as plt

    top = max(frame["predicted_bytes"].max(), frame["kv_nbytes"].max())
    div, unit = unit_for(top)
    xs = sorted(frame["length"].unique())
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(xs, [per_token * x / div for x in xs], color="0.3", lw=1, label=f"predicted ({per_token:,} B/token)")
    for layout, marker in (("preallocated", "o"), ("grown", "s")):
        f = frame[frame["layout"] == layout]
        ax.scatter(f["length"], f["kv_nbytes"] / div, marker=marker, facecolors="none", edgecolors="tab:blue",
                   label=f"{layout}: KVCache.nbytes()")
        if f["cuda_allocated_delta"].notna().any():
            ax.scatter(f["length"], f["cuda_allocated_delta"] / div, marker="x", color="tab:red",
                       label=f"{layout}: CUDA allocated delta")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)
    ax.set_title(title or "KV cache: predicted vs measured", fontsize=9)
    fig.tight_layout()
    return fig
