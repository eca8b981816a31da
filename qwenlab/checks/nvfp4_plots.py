"""Figures of notebook 06 (NVFP4): per-weight error, KL per position, planted bugs against honest noise."""
from __future__ import annotations

import numpy as np

from qwenlab.checks.plots import figure

KIND_COLORS = {"q_proj": "#1f77b4", "k_proj": "#aec7e8", "v_proj": "#ff7f0e", "o_proj": "#ffbb78",
               "gate_proj": "#2ca02c", "up_proj": "#98df8a", "down_proj": "#d62728", "lm_head": "#9467bd"}


def weight_error_figure(frame, title: str = "NVFP4 quantization error per weight"):
    """Signal-to-noise of every quantized weight against the unquantized checkpoint (-NMSE, dB), forward order,
    coloured by kind: about 20 dB for Gaussian-like weights; a weight far below its neighbours has outliers."""
    fig, ax = figure(max(6.4, 0.06 * len(frame) + 3), 3.0)
    snr = -frame["nmse_db"]
    ax.bar(range(len(frame)), snr, color=[KIND_COLORS.get(k, "#777") for k in frame["kind"]], width=0.85)
    ax.set_xlabel("quantized weight (forward order)", fontsize=8)
    ax.set_ylabel("SNR = -NMSE (dB, higher is better)", fontsize=8)
    ax.set_ylim(0, max(snr.max() * 1.45, 1.0))
    handles = [ax.bar(0, 0, color=c, label=k) for k, c in KIND_COLORS.items() if k in set(frame["kind"])]
    ax.legend(handles=handles, fontsize=7, ncol=4, loc="upper right")
    ax.set_title(title, fontsize=10)
    return fig


def kl_figure(kl_per_position, title: str = "KL(unquantized || NVFP4) per position"):
    fig, ax = figure(6.4, 2.8)
    kl = np.clip(np.asarray(kl_per_position, dtype=float), 1e-8, None)
    ax.hist(np.log10(kl), bins=40, color="#4c72b0")
    for q, style in ((0.5, "--"), (0.99, ":")):
        ax.axvline(np.log10(np.quantile(kl, q)), color="#c44e52", linestyle=style, label=f"p{int(q * 100)}")
    ax.set_xlabel("log10 KL per position", fontsize=8)
    ax.set_ylabel("positions", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return fig


def planted_figure(frame, honest_quantized: float | None,
                   title: str = "planted NVFP4 bugs at the first quantized tensor"):
    """rel_l2 at the expected tensor (log scale): each bug against the references that ran, and the honest model.
    The legend sits below the axes, clear of the bars."""
    fig, ax = figure(6.4, 3.4)
    labels = list(frame.index)
    y = np.arange(len(labels))
    if "rel_l2_vs_quantized" in frame:
        ax.barh(y - 0.2, frame["rel_l2_vs_quantized"], height=0.38, color="#c44e52", label="bug vs quantized reference")
        ax.axvline(max(honest_quantized or 0.0, 1e-9), color="#2ca02c", linestyle=":",
                   label="honest NVFP4 vs quantized")
    if "rel_l2_vs_unquantized" in frame:
        ax.barh(y + 0.2, frame["rel_l2_vs_unquantized"], height=0.38, color="#dd8452",
                label="bug vs unquantized reference")
        ax.axvline(frame["honest_rel_l2_vs_unquantized"].iloc[0], color="#4c72b0", linestyle="--",
                   label="honest NVFP4 vs unquantized")
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("rel_l2 at the first quantized tensor (log)", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax.set_title(title, fontsize=10)
    return fig
