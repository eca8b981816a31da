"""Small matplotlib figures shared by the numbered notebooks. Each returns the Figure (shown inline by the kernel)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

COLORS = {"kv": "#1f77b4", "replay": "#d62728", "reference": "#2ca02c", "used": "#4c72b0", "unused": "#dd8452",
          "session": "#1f77b4", "rebuild": "#9467bd"}


def figure(width: float = 6.4, height: float = 3.2, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=(width, height), constrained_layout=True)
    return fig, axes


def barh(values: dict, title: str, xlabel: str, highlight=None, annotate: str = "{:.2f}"):
    """Horizontal bars, one per key; keys in `highlight` drawn red."""
    labels, data = list(values), [float(v) for v in values.values()]
    fig, ax = figure(6.4, 0.22 * len(labels) + 1.0)
    colors = ["#c44e52" if highlight and k in highlight else "#4c72b0" for k in labels]
    ax.barh(labels, data, color=colors, height=0.7)
    ax.tick_params(axis="y", labelsize=8)
    ax.invert_yaxis()
    for y, v in enumerate(data):
        ax.text(v, y, " " + annotate.format(v), va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(data + [1e-9]) * 1.18)
    return fig


def fallback_inflation_plot(inflation):
    """Notebook 01: per corpus category, how many tokens a byte fallback emits (one per UTF-8 byte) for each
    tokenizer.json token; `inflation` is tokenizer_parity.fallback_inflation's frame."""
    return barh(inflation["fallback_ratio"].to_dict(), "byte fallback: tokens per tokenizer.json token, by category",
                "byte-fallback tokens (one per UTF-8 byte) / tokenizer.json tokens")


def log_ticks(axis, values):
    """A log axis labelled at 1-2-5 steps that bracket `values`, so it shows at least two labelled ticks however
    narrow the range (matplotlib's default labels only powers of ten: one label, or none, within a decade)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return
    lo, hi = values.min(), values.max()
    steps = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 2)
             for m in (1, 2, 5)]
    below = max(t for t in steps if t <= lo * (1 + 1e-9))
    above = min(t for t in steps if t >= hi * (1 - 1e-9) and t > below)
    ticks = [t for t in steps if below <= t <= above]
    if len(ticks) > 7:  # wide ranges: powers of ten only, still bracketing the data
        ticks = [t for t in ticks if np.isclose(np.log10(t), round(np.log10(t)))]
        ticks = sorted({10.0 ** np.floor(np.log10(below)), *ticks, 10.0 ** np.ceil(np.log10(above))})
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())
    getattr(axis.axes, f"set_{axis.axis_name}lim")(ticks[0] / 1.15, ticks[-1] * 1.15)


def rel_l2_heatmap(grid, floor: float | None = None, exceeds=None,
                   title: str = "rel_l2 by layer and activation point", vmin: float = 1e-9):
    """Layers down, activation points across, log colour scale; exact zeros shown at vmin, missing cells blank.
    `floor` is drawn on the colour bar; cells flagged in `exceeds` (same shape as grid) are outlined in red."""
    values = grid.to_numpy(dtype=float)
    shown = np.where(np.isnan(values), np.nan, np.clip(values, vmin, None))
    vmax = max(1.0, np.nanmax(shown) if np.isfinite(shown).any() else 1.0)
    rows = values.shape[0]
    fig, ax = figure(max(6.4, 0.42 * values.shape[1] + 1.5), min(0.38 * rows + 1.9, 7.0))
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis", norm=LogNorm(vmin=vmin, vmax=vmax))
    ax.set_xticks(range(values.shape[1]), list(grid.columns), rotation=60, ha="right", fontsize=8)
    step = 1 if rows <= 16 else int(np.ceil(rows / 12))
    ax.set_yticks(range(0, rows, step), [f"layer {i}" for i in grid.index[::step]], fontsize=8)
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label("rel_l2 (log)", fontsize=8)
    if floor is not None:
        bar.ax.axhline(floor, color="red", linewidth=3)
        bar.ax.text(-0.2, floor, "floor", color="red", fontsize=7, ha="right", va="center",
                    transform=bar.ax.get_yaxis_transform())
    if exceeds is not None:
        flags = exceeds.reindex(index=grid.index, columns=grid.columns).fillna(False).to_numpy(dtype=bool)
        for (r, c), bad in np.ndenumerate(flags):
            if bad:
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_title(title, fontsize=10)
    return fig


def row_norm_histogram(norms, used_vocab: int, rug=None, labelled: dict | None = None,
                       title: str = "embedding row norms"):
    """Histogram of every row's L2 norm (rows the tokenizer can produce vs padding rows); `rug` norms (the prompt's
    tokens) as ticks along the bottom, `labelled` {label: norm} as annotated vertical lines."""
    norms = np.asarray(norms, dtype=float)
    fig, ax = figure(6.4, 3.0)
    top = norms.max() if norms.max() > norms.min() else norms.min() + 1
    bins = np.linspace(norms.min(), top, 80)
    ax.hist(norms[:used_vocab], bins=bins, color=COLORS["used"], alpha=0.8, label=f"ids < {used_vocab} (tokenizer)")
    if len(norms) > used_vocab:
        ax.hist(norms[used_vocab:], bins=bins, color=COLORS["unused"], alpha=0.9,
                label=f"ids >= {used_vocab} (never produced)")
    ax.set_yscale("log")
    if rug is not None and len(rug):
        ax.plot(np.asarray(rug, dtype=float), np.full(len(rug), 0.03), "|", color="black", markersize=14,
                markeredgewidth=1.2, transform=ax.get_xaxis_transform(), label="prompt tokens")
    for i, (label, value) in enumerate((labelled or {}).items()):
        ax.axvline(value, color="#c44e52", linewidth=0.9, linestyle="--")
        ax.text(value, 0.95 - 0.08 * i, f" {label}", fontsize=7, va="top", color="#c44e52",
                transform=ax.get_xaxis_transform())
    ax.set_xlabel("row L2 norm")
    ax.set_ylabel("rows (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.75))
    return fig


def latency_plot(steps, by_position=None, title: str = "decode latency: kv cache vs full replay"):
    """Left: ms per token along one generation, per mode (dotted, right axis: tokens run through the model per step).
    Right (when `by_position` is given): ms per token against the context length, log-log."""
    ncols = 2 if by_position is not None else 1
    fig, axes = figure(5.6 * ncols, 3.2, ncols)
    ax = axes[0] if ncols == 2 else axes
    twin = ax.twinx()
    for mode, group in steps.groupby("mode"):
        ax.plot(group["position"], group["step_ms"], ".-", markersize=3, linewidth=1,
                color=COLORS.get(mode), label=f"{mode}: ms per token")
        work = group["position"] + 1 if mode == "replay" else group["position"] * 0 + 1
        twin.plot(group["position"], work, ":", color=COLORS.get(mode), linewidth=1.2,
                  label=f"{mode}: tokens run per step")
    ax.set_xlabel("sequence position of the new token")
    ax.set_ylabel("ms per token")
    top = 2.0 * steps["step_ms"].quantile(0.95)
    clipped = int((steps["step_ms"] > top).sum())
    ax.set_ylim(0, top)
    if clipped:
        ax.text(0.99, 0.98, f"{clipped} step(s) above {top:.0f} ms not shown", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="gray")
    twin.set_ylim(bottom=0)
    twin.set_ylabel("tokens run per step (dotted)", fontsize=8)
    twin.tick_params(labelsize=7)
    ax.set_title(title, fontsize=10)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    if by_position is not None:
        ax2 = axes[1]
        for mode, group in by_position.groupby("mode"):
            group = group.sort_values("position")
            ax2.plot(group["position"], group["ms_per_token"], "o-", color=COLORS.get(mode), label=mode, markersize=4)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ticks = sorted(by_position["position"].unique())
        ax2.set_xticks(ticks, [str(t) for t in ticks])
        ax2.minorticks_off()
        log_ticks(ax2.yaxis, by_position["ms_per_token"])
        ax2.set_xlabel("context length (tokens)")
        ax2.set_ylabel("ms per new token")
        ax2.set_title("cost of one token vs context length", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(True, which="both", alpha=0.3)
    return fig


def turn_plot(turns, title: str = "time per chat turn by strategy"):
    strategies = list(dict.fromkeys(turns["strategy"]))
    fig, ax = figure(4.8, 2.8)
    width = 0.8 / max(len(strategies), 1)
    for k, strategy in enumerate(strategies):
        group = turns[turns["strategy"] == strategy]
        ax.bar(group["turn"] + (k - (len(strategies) - 1) / 2) * width, group["turn_s"] * 1000, width,
               label=strategy, color=COLORS.get(strategy))
    ax.set_xlabel("chat turn")
    ax.set_ylabel("ms per turn")
    ax.set_xticks(sorted(turns["turn"].unique()))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
