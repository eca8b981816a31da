"""The figure notebook 03 and 06 lead with: the candidate's error over its measured floor, layer by layer."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def ratio_by_layer_plot(ratios, title: str):
    """ratios: DataFrame indexed by layer with columns `accumulated` and (optionally) `isolated`: the largest
    rel_l2 / floor among each layer's tensors. The gate is 1: below it a layer is inside its precision budget."""
    fig, ax = plt.subplots(figsize=(7.2, 3.4), constrained_layout=True)
    layers = np.asarray(ratios.index, dtype=float)
    styles = {"accumulated": ("#4c72b0", "o", "accumulated (the run as it is)"),
              "isolated": ("#dd8452", "s", "isolated (each layer fed the reference's input)")}
    top = 1.0
    for column, (color, marker, label) in styles.items():
        if column in ratios:
            values = ratios[column].to_numpy(dtype=float)
            ax.plot(layers, values, marker=marker, markersize=3, color=color, label=label, linewidth=1.2)
            over = values > 1
            ax.scatter(layers[over], values[over], s=40, facecolors="none", edgecolors="#c44e52", zorder=3)
            top = max(top, np.nanmax(values) if len(values) else 1.0)
    ax.axhline(1.0, color="#c44e52", linestyle="--", linewidth=1, label="floor (the gate)")
    ax.set_yscale("log")
    ax.set_ylim(max(1e-3, np.nanmin(ratios.to_numpy(dtype=float)) / 2 if ratios.size else 1e-3), top * 2)
    ax.set_xlabel("layer")
    ax.set_ylabel("error / floor (max over the layer)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return fig
