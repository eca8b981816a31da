# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: qwenlab
#     language: python
#     name: qwenlab
# ---

# %% [markdown]
# # 06 · NVFP4 quantization
#
# **Two questions: is my NVFP4 path right, and what does NVFP4 cost?**
#
# The story's NVFP4 port produced fluent-looking but wrong text, and the cause (the interop layer to the FP4
# kernels) took days to find, because quantization noise and a quantization bug look alike at the output. They
# separate when each is measured against the right reference:
#
# * **quantized reference**: transformers running the *same* NVFP4 numbers (a compressed-tensors checkpoint,
#   decompressed at load). An honest NVFP4 path matches it to bfloat16 rounding (transformers dequantizes through
#   bfloat16), so the floors are bfloat16's and a bug stands out at the tensor where it starts.
# * **unquantized reference**: transformers on the bf16/fp32 checkpoint the NVFP4 one came from. The difference is
#   the price of NVFP4: per weight, per activation, and in the `llama-perplexity --kl-divergence` statistics.
#
# The model is quantized at load when `model_dir` is not NVFP4 (the report's tiny model); an NVFP4 checkpoint
# (ModelOpt or compressed-tensors layout) is used as it is, and the unquantized side then needs `unquantized_model`.
# The quantized reference is written to a temp folder (never into the model's folder). doc/nvfp4.md has the format.
#
# Each section holds only the references it needs: the quantized ones (section 2) are freed before the unquantized
# one loads (sections 3-4), and each loads only when the memory model says it fits beside what is loaded (spread
# over the GPUs when there are several). One that does not fit is said so: section 2 without its float32 reference
# falls back to the fixed limits; a section without its reference is skipped, and not gated.

# %% tags=["parameters"]
model_dir = ""  # checkpoint directory (HF layout); empty: the embedded tiny fixture
device = "cpu"
dtype = "float32"
out_dir = ""  # run folder of `qwenlab report`; empty: reports/scratch
thresholds_dir = ""  # folder of <notebook>.json thresholds; empty: data/thresholds
quant = ""  # nvfp4 (W4A16) | nvfp4-w4a4; empty: nvfp4, or as stored when model_dir is already NVFP4
device_map = ""  # qwenlab's layers across devices: balanced | 0:0-31,1:32-63 (doc/placement.md); empty: on device
quant_reference = "both"  # quantized | unquantized | both: the references to compare with
unquantized_model = ""  # the bf16/fp32 checkpoint an NVFP4 model_dir came from; empty: model_dir (quantized at load)
prompts = [
    "The quick brown fox jumps over the lazy dog.",
    "chat:What is the capital of France? Answer in one word.",
]  # raw text, or chat:<user turn>, for the activation diffs
corpus = [
    "Water boils at one hundred degrees Celsius at sea level.",
    "def add(a, b):\n    return a + b\n",
    "chat:Give me three tips for a good night's sleep.",
    "Die Katze schläft auf dem Sofa, und draußen regnet es. 東京は日本の首都です。",
]  # prompts for the KL statistics (plus the perplexity text)
perplexity_tokens = 192  # tokens of data/nvfp4_perplexity_text.txt
run_variants = True  # lm_head / first and last layers in high precision, W4A4
plant_bugs = True  # the three planted interop bugs

# %%
import os

import pandas as pd
import torch

try:
    from IPython.display import display
except ImportError:  # run as a plain script (scripts/gpu_nvfp4_evidence.sh without jupyter)
    display = print

from qwenlab.activations.diff import rel_l2_grid, styled
from qwenlab.activations.floors import Gates
from qwenlab.activations.nvfp4_reference import quantized_reference_gap
from qwenlab.checks import floor_plots, nbutil, nvfp4_plots, plots
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks import nvfp4_kl as kl
from qwenlab.checks import nvfp4_quantization as nq
from qwenlab.model.tiny import resolve_model_dir

os.environ["HF_HUB_OFFLINE"] = "1"
NOTEBOOK = "06_nvfp4_quantization"
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
model_path = resolve_model_dir(model_dir)
cuda = torch.device(device).type == "cuda"
requested_before = nq.requested_now(device)  # bytes asked of the CUDA allocator (its rounding is not the load's)
workspace = nq.workspace_overhead(device)  # cuBLAS's workspace: a fixed cost of the device, allowed for below
ckpt = nq.load_quantized(model_path, dtype, device, quant, device_map)
requested_load = nq.requested_now(device) - requested_before
model, tok, info = ckpt.model, ckpt.tokenizer, ckpt.model.quantization
not_applicable = nq.not_applicable(ckpt)
source = nq.source_dir(ckpt, unquantized_model)
quantized_note = None if not_applicable else quantized_reference_gap(ckpt)  # NVFP4 MoE experts (doc/moe.md)
use_quantized = quant_reference in ("quantized", "both") and not not_applicable
use_unquantized = quant_reference in ("unquantized", "both") and source is not None and not not_applicable
compare_dtype = nq.compare_dtype(model)
corpus_ids = [ld.encode_prompt(tok, p) for p in corpus]
text_ids = kl.perplexity_ids(tok, perplexity_tokens)
print(f"model {model_path} · {model.dtype} on {model.device}")
print(not_applicable or info.summary())
if quantized_note:
    print(f"quantized reference: {quantized_note}")
print(f"unquantized checkpoint: {source or 'none (set unquantized_model): the unquantized sections are skipped'}")

# %% [markdown]
# ## 1. Per-weight quantization error
#
# Every quantized weight dequantized and compared with the unquantized checkpoint's: rel_l2 = |W_q - W| / |W| and
# NMSE in dB (20 log10 rel_l2; the figure shows SNR = -NMSE). FP4 E2M1 with one E4M3 scale per 16 values gives
# about -20 dB on Gaussian-like weights; a tensor far worse than its neighbours has outliers its blocks cannot hold.

# %%
weights = nq.weight_errors(model, source) if source is not None and not not_applicable else None
if weights is not None:
    display(weights.describe().loc[["mean", "min", "max"], ["rel_l2", "nmse_db", "max_abs"]])
    display(weights.sort_values("rel_l2", ascending=False).head(8))
    fig = nvfp4_plots.weight_error_figure(weights)
    nbutil.save_figure(fig, out_dir, NOTEBOOK, "weight_error")
else:
    print("no unquantized checkpoint: per-weight error skipped")

# %% [markdown]
# ## 2. Against the quantized reference: is the NVFP4 path right?
#
# Same prompts, both implementations, every canonical activation. The floors are measured (doc/floors.md): the
# quantized reference in the comparison dtype against itself in float32, on the same prompts (a float32 run is
# compared in bfloat16: transformers rounds the dequantized weights through bfloat16). Beside the accumulated diff,
# each layer runs isolated, fed the float32 quantized reference's input. A red row is a bug in the NVFP4 path; the
# first one is where it starts. When the float32 quantized reference does not fit beside the model and the
# quantized reference (a 32B model on one GPU), the floors are the dtype's defaults and the logits limits the
# thresholds' `unmeasured_logits`, and the line below says so.

# %%
floor_u = thresholds["unquantized_floor"]
gates_q = Gates.from_thresholds(thresholds["quantized_reference"])
refs_q = nq.quantized_references(ckpt, compare_dtype, nq.longest(tok, prompts)) if use_quantized \
    else nq.References(model.device)
diffs_q = nq.quantized_diffs(model, refs_q, tok, prompts, gates_q, compare_dtype)
refs_q.release()  # the captures are kept (diffs_q); the models go before the unquantized reference loads
for line in refs_q.lines("the quantized reference"):
    print(line)
if diffs_q:
    display(ld.summary_frame(diffs_q))
    table_q = ld.worst_frame(diffs_q)
    fig = floor_plots.ratio_by_layer_plot(ld.ratio_by_layer(table_q, ld.isolated_table(diffs_q)),
                                          f"NVFP4 (qwenlab) vs quantized reference: error / floor ({compare_dtype})")
    nbutil.save_figure(fig, out_dir, NOTEBOOK, "error_over_floor", key=True)
    print(f"first divergent tensor vs the quantized reference: {ld.first_divergence(table_q) or 'none'}")
    display(styled(table_q[["prompt", "status", "rel_l2", "cosine", "nmse_db", "floor", "exceeds"]]))
    fig = plots.rel_l2_heatmap(rel_l2_grid(table_q), exceeds=ld.exceeds_grid(table_q),
                               title="NVFP4 (qwenlab) vs quantized reference (transformers): rel_l2")
    nbutil.save_figure(fig, out_dir, NOTEBOOK, "heatmap_quantized_reference", key=True)

# %% [markdown]
# ## 3. Against the unquantized reference: the price of NVFP4, layer by layer
#
# The same view against the model before quantization, with one floor (thresholds `unquantized_floor`) for honest
# NVFP4 noise. The noise starts at the first quantized tensor and grows with depth; a bug jumps far above it.
# The unquantized reference stays loaded for section 4 and is freed after it.

# %%
refs_u = nq.unquantized_reference(model, source if use_unquantized else None,
                                  nq.longest(tok, prompts, corpus_ids + [text_ids]))
diffs_u = nq.unquantized_diffs(model, refs_u, tok, prompts, gates_q, floor_u)
for line in refs_u.lines("the unquantized reference"):
    print(line)
if diffs_u:
    display(ld.summary_frame(diffs_u))
    table_u = ld.worst_frame(diffs_u)
    print(f"first tensor over the NVFP4 noise floor {floor_u}: {ld.first_divergence(table_u) or 'none'}")
    fig = plots.rel_l2_heatmap(rel_l2_grid(table_u), floor=floor_u, exceeds=ld.exceeds_grid(table_u),
                               title="NVFP4 (qwenlab) vs unquantized reference: rel_l2")
    nbutil.save_figure(fig, out_dir, NOTEBOOK, "heatmap_unquantized_reference", key=True)

# %% [markdown]
# ## 4. Over a corpus: the `llama-perplexity --kl-divergence` statistics
#
# Every position of the corpus prompts and of a committed text: KL(unquantized || NVFP4) mean, median, p99 and max,
# how often both pick the same top token, RMS of delta-p (change in the probability of the token that actually
# comes next), and the perplexity ratio NVFP4 / unquantized on the text. (The tiny model's weights are random:
# its perplexity is huge on any text; the ratio is what to read.)

# %%
corpus_stats = None
corpus_data = nq.corpus_reference(refs_u, corpus_ids, text_ids)
refs_u.release()  # the corpus keeps the reference's side of it; sections 5-6 need no reference model
if corpus_data is not None:
    corpus_stats = corpus_data.stats(model)
    display(pd.Series({k: v for k, v in corpus_stats.items() if k != "kl_per_position"}, name="NVFP4").to_frame())
    fig = nvfp4_plots.kl_figure(corpus_stats["kl_per_position"])
    nbutil.save_figure(fig, out_dir, NOTEBOOK, "kl_per_position")

# %% [markdown]
# ## 5. What to keep in high precision
#
# The same corpus for variants quantized at load from the unquantized checkpoint: the default (every decoder
# linear, lm_head kept), lm_head quantized too, the first and last decoder layers kept, and W4A4 (activations
# quantized per 16-block as an NVFP4 GEMM on Blackwell would).

# %%
variant_frame = None
if run_variants and corpus_data is not None:
    variant_frame = nq.variant_table(source, dtype, device, corpus_data, model.config.num_hidden_layers)
    display(variant_frame)

# %% [markdown]
# ## 6. Planted interop bugs
#
# Three bugs of the kind the story's port had, planted in copies of the NVFP4 model: the nibble order swapped, the
# block scale applied twice, the per-tensor scale inverted (as between the ModelOpt and compressed-tensors
# conventions). Against the quantized reference each must be named at the first quantized tensor in forward order;
# against the unquantized one each must stand far above honest NVFP4 noise at that tensor (`times_honest_noise`).

# %%
planted_frame = None
if plant_bugs and (diffs_q or diffs_u):
    first_q, first_u = diffs_q[0] if diffs_q else None, diffs_u[0] if diffs_u else None
    result = nq.planted(model, (first_q or first_u).ids, first_q and first_q.reference,
                        first_u and first_u.reference, floor_u, first_u and first_u.result)
    planted_frame = result.frame
    display(planted_frame)
    expected = nq.expected_first(model)
    honest_q = next(r["rel_l2"] for r in first_q.result.rows if r["name"] == expected) if first_q else None
    fig = nvfp4_plots.planted_figure(planted_frame, honest_q)
    nbutil.save_figure(fig, out_dir, NOTEBOOK, "planted_bugs")

# %% [markdown]
# ## 7. Memory: the memory model's NVFP4 estimate against the load
#
# Predicted: the checkpoint's shapes with each quantized linear at 4.5 bits per weight (packed codes, one E4M3 scale
# per 16) plus its FP32 scales, everything else in the run dtype. Measured: the parameter and buffer storage of the
# loaded model (and on CUDA the bytes the load's tensors asked the allocator for).

# %%
memory = nq.memory_check(model, thresholds["weights_rel_error_max"], requested_load, workspace)
display(memory)

# %% [markdown]
# ## Verdict
#
# Pass when every quantized weight is within `max_weight_rel_l2`, no prompt diverges from the quantized reference
# (bfloat16 floors), the unquantized comparison stays under the NVFP4 noise floor and the corpus statistics within
# their limits, every planted bug is named at its tensor and stands `min_planted_times_honest` times above honest
# noise, and the memory estimate matches the load (thresholds in `data/thresholds/06_nvfp4_quantization.json`).

# %%
if not_applicable:
    metrics, reasons = {"not_applicable": not_applicable, "summary": not_applicable}, []
else:
    metrics, reasons = nq.verdict(thresholds, info=info, weights=weights, quantized=diffs_q, unquantized=diffs_u,
                                  corpus_stats=corpus_stats, variant_frame=variant_frame,
                                  planted_frame=planted_frame, memory=memory,
                                  notes=nq.reference_notes(refs_q, refs_u))
    for note in metrics["notes"].values():
        print(note)
for what, refs in (("quantized", refs_q), ("unquantized", refs_u)):
    if refs.error:
        reasons.append(f"the {what} reference did not load: {refs.error}")
metrics |= {"dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
            "quant_reference": quant_reference, "quantized_reference_error": refs_q.error,
            "unquantized_reference_error": refs_u.error,
            "quantized_reference_note": quantized_note,
            "unquantized_model": str(source) if source else None}
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
print(nbutil.verdict_line(record))
