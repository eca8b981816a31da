"""The figures the report's index shows, read as a newcomer would: every log axis labelled at least twice, strategies
that coincide still told apart and said to coincide, legends clear of the data, titles that agree with their axes."""
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.transforms import Bbox

from qwenlab.checks import nvfp4_plots, plots
from qwenlab.memory import plots as mem_plots

MiB = 2 ** 20


def labelled_ticks(axis) -> list[str]:
    """Tick labels that are drawn: non-empty and inside the axis's view."""
    lo, hi = sorted(axis.get_view_interval())
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()
            and lo <= (t.get_position()[1] if axis.axis_name == "y" else t.get_position()[0]) <= hi]


def steps_frame():
    positions = list(range(40, 46))
    return pd.DataFrame({"mode": ["kv"] * 6 + ["replay"] * 6, "position": positions * 2,
                         "step_ms": [1.0, 1.1, 1.2, 1.0, 1.3, 1.1, 2.0, 2.4, 2.6, 2.9, 3.1, 3.4]})


@pytest.mark.parametrize("ms", [[120, 140, 150, 175], [8, 9, 11, 14], [100, 100, 100, 100], [0.5, 3, 80, 9000]])
def test_latency_log_axis_has_two_labels_whatever_the_range(ms):
    by_position = pd.DataFrame({"mode": ["kv", "kv", "replay", "replay"], "position": [16, 64, 16, 64],
                                "ms_per_token": ms})
    fig = plots.latency_plot(steps_frame(), by_position)
    fig.canvas.draw()
    left, right, _ = fig.axes
    labels = labelled_ticks(right.yaxis)
    assert len(labels) >= 2, labels
    assert [float(t) for t in labels] == sorted(float(t) for t in labels)
    lo, hi = right.get_ylim()
    assert lo <= min(ms) and max(ms) <= hi  # every point is inside the labelled range
    assert labelled_ticks(right.xaxis) == ["16", "64"]
    # The left panel's legend sits below its axes, not over the per-token lines.
    assert left.get_legend().get_window_extent().y1 < left.get_window_extent().y0
    plt.close(fig)


def strategies_frame(peaks: dict) -> pd.DataFrame:
    rows = []
    for k, (strategy, peak) in enumerate(peaks.items()):
        for turn in range(4):
            rows.append({"strategy": strategy, "turn": turn, "latency_s": 0.1 * (k + 1) * (turn + 1),
                         "tokens_computed": 10 * (turn + 1) ** (k + 1), "peak_bytes": peak + turn * 1024,
                         "peak_reserved_bytes": np.nan})
    return pd.DataFrame(rows)


def test_strategies_stay_distinguishable_where_they_coincide():
    frame = strategies_frame({"session": 543 * MiB, "rebuild": 543 * MiB, "replay": 543 * MiB})
    fig = mem_plots.plot_strategies(frame)
    latency, tokens, peak = fig.axes
    for ax in fig.axes:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["session", "rebuild", "replay"]
        assert len({(line.get_marker(), str(line.get_linestyle())) for line in lines}) == 3
        assert len({line.get_markersize() for line in lines}) == 3  # nested markers: each visible where they meet
        xs = [tuple(line.get_xdata()) for line in lines]
        assert len(set(xs)) == 3 and all(abs(a - b) < 0.5 for a, b in zip(xs[0], xs[2]))  # dodged, same turns
    assert [t.get_text() for t in peak.texts] == ["all 3 strategies coincide (within 0.1%)"]
    assert len(latency.texts) == len(tokens.texts) == 0
    assert "host VmHWM" in peak.get_title()
    assert "wall time of one whole turn" in fig._suptitle.get_text()
    plt.close(fig)


def test_strategies_that_differ_are_not_said_to_coincide():
    frame = strategies_frame({"session": 500 * MiB, "rebuild": 540 * MiB, "replay": 520 * MiB})
    frame["peak_reserved_bytes"] = frame["peak_bytes"] * 1.5
    fig = mem_plots.plot_strategies(frame)
    assert len(fig.axes[2].texts) == 0 and "CUDA allocated" in fig.axes[2].get_title()
    plt.close(fig)


def test_planted_legend_does_not_cover_the_bars():
    frame = pd.DataFrame({"rel_l2_vs_quantized": [0.9, 0.5, 2.0], "rel_l2_vs_unquantized": [1.0, 0.6, 2.2],
                          "honest_rel_l2_vs_unquantized": [0.1] * 3},
                         index=["nibble order swapped", "block scale applied twice", "tensor scale inverted"])
    fig = nvfp4_plots.planted_figure(frame, honest_quantized=1e-6)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches if p.get_width() > 0]
    assert len(bars) == 6
    assert not any(legend.overlaps(bar) for bar in bars)
    assert not legend.overlaps(Bbox(ax.get_window_extent().get_points()))  # clear of the whole plot area
    plt.close(fig)


def test_fallback_figure_title_and_axis_name_the_same_ratio():
    inflation = pd.DataFrame({"bytes": [30, 12], "tokens": [10, 6]}, index=["emoji", "english"])
    inflation["fallback_ratio"] = inflation["bytes"] / inflation["tokens"]
    ax = plots.fallback_inflation_plot(inflation).axes[0]
    assert "tokens per tokenizer.json token" in ax.get_title()
    assert ax.get_xlabel().startswith("byte-fallback tokens") and ax.get_xlabel().endswith("/ tokenizer.json tokens")
    assert [p.get_width() for p in ax.patches] == [3.0, 2.0]
    plt.close(ax.figure)
