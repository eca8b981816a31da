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
# # 03 · Layer-by-layer activation diffs
#
# **Question: is every activation of the forward inside the precision budget of this model in this dtype, and if
# not, where does it first go wrong?**
#
# Both implementations run the same prompts; every canonical activation (doc/dump-format.md: `embed`, per layer
# `input`, `input_layernorm`, `attn.q_proj` ... `output`, then `norm`, `logits`) is compared with max-abs, rel_l2,
# cosine and NMSE; a MoE layer's chosen experts (`mlp.router_ids`) by routing agreement (section 7). The floors
# are **measured** (doc/floors.md): transformers run in this dtype against transformers
# in float32 on the same prompt gives each tensor's own precision noise; a tensor is red when the candidate's
# rel_l2 exceeds a multiple of it (data/thresholds/03_layer_diffs.json). A float32 run has no lower-precision noise
# to measure and is held to the float32 fallbacks. The **first** red tensor in forward order is where a bug is;
# later rows only inherit it.
#
# Beside that accumulated diff, each layer runs **isolated**: fed the float32 reference's input to it (teacher
# forcing through the replace hooks), so its error is its own and does not ride on what earlier layers did. A
# small bug deep in a large model, which accumulated bf16 noise can hide, stands out there.
#
# With `candidate` set to a dump file written by any implementation (any language with a safetensors writer), the
# dump replaces qwenlab's forward: the references run on the dump's own `prompt_ids`, in the dump's declared dtype.
#
# Before anything loads, a plan says where the models go (doc/placement.md). They run one after the other, each
# capturing every prompt before it is freed: the float32 reference, the reference in the run dtype, then qwenlab
# (or only the references, for a candidate dump); a model too large for one GPU is split across them. The planted
# bugs are activation patches or parameter substitutions for one capture, so they run under every placement.

# %% tags=["parameters"]
model_dir = ""  # checkpoint directory (HF layout); empty: the embedded tiny fixture
device = "cpu"
dtype = "float32"
out_dir = ""  # run folder of `qwenlab report`; empty: reports/scratch
thresholds_dir = ""  # folder of <notebook>.json thresholds; empty: data/thresholds
quant = ""  # nvfp4 | nvfp4-w4a4: load the model quantized (doc/nvfp4.md); empty: as the checkpoint is
prompts = [
    "The quick brown fox jumps over the lazy dog.",
    "chat:What is the capital of France? Answer in one word.",
    "数学とコード: sum(range(10)) 是 45 👍🏽",
]  # raw text, or chat:<user turn>
candidate = ""  # activation dump (.safetensors) from another implementation; empty: run qwenlab
allow_missing = False  # pass although the candidate lacks reference tensors it does not declare in not_produced
attention = ""  # qwenlab attention, sdpa or eager; empty: the model's default
plant_bugs = True  # run the planted-bug section
quant_reference = "quantized"  # a quantized model against: quantized (transformers, same NVFP4 numbers) | unquantized
unquantized_model = ""  # quant_reference unquantized with an NVFP4 model_dir: the checkpoint it came from
placement = "auto"  # auto | resident | sequential | split (doc/placement.md)
device_map = ""  # qwenlab's layers across GPUs: balanced | 0:0-31,1:32-63; empty: from the plan

# %%
import os

import pandas as pd
from IPython.display import display

import qwenlab as ql
from qwenlab.activations.diff import rel_l2_grid, styled
from qwenlab.activations.floors import Gates
from qwenlab.checks import floor_plots, nbutil, plots
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks import placement as pl

os.environ["HF_HUB_OFFLINE"] = "1"
NOTEBOOK = "03_layer_diffs"
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
gates = Gates.from_thresholds(thresholds)
spec = ql.LoadSpec.from_params(model_dir, dtype, device, quant, device_map)
plan = pl.plan_for(spec, prompts, placement)
print(plan.describe())

# %% [markdown]
# ## 1. Capture and diff
#
# One row per prompt: tokens, tensors compared, the first divergent tensor (None when none), the largest rel_l2,
# the tensor that came closest to its floor, the first isolated divergence, and the logits statistics
# (KL(ref||cand) per position, top-1 agreement, delta-p of the reference's top token).

# %%
pl.reset_peaks()
run = pl.run_layer_diffs(spec, prompts, plan, gates, candidate=candidate, allow_missing=allow_missing,
                         attention=attention or None, overrides=thresholds.get("floors") or None,
                         quant_reference=quant_reference, unquantized_model=unquantized_model, plant_bugs=plant_bugs)
diffs = run.diffs
config = ld.checkpoint_config(spec)
if candidate:
    display(ld.candidate_identity(run.candidate_meta, config).to_frame("candidate"))
summary = ld.summary_frame(diffs)
print(f"{run.dtype} · floors: {'measured' if diffs[0].noise is None or diffs[0].noise.measured else 'defaults'} · "
      f"phases (s): {run.seconds}")
display(summary)

# %% [markdown]
# ## 2. Inside the precision budget? Error over floor, layer by layer
#
# For each layer, the largest rel_l2 / floor among its tensors: the run as it is (accumulated) and each layer fed
# the float32 reference's input (isolated). Below the dashed line everywhere, the candidate is inside the budget
# that transformers itself spends in this dtype. An accumulated curve that crosses the line at one layer and stays
# above is a bug there; an isolated point above the line names a layer whose own computation is wrong, even when
# the accumulated curve hides it.

# %%
table = ld.worst_frame(diffs)
isolated = ld.isolated_table(diffs)
ratios = ld.ratio_by_layer(table, isolated)
fig = floor_plots.ratio_by_layer_plot(ratios, f"{'candidate' if candidate else 'qwenlab'} error / measured floor "
                                              f"({run.dtype})")
figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "error_over_floor", key=True)

# %% [markdown]
# ## 3. The full table
#
# Every tensor in forward order; for several prompts each row shows the prompt where that tensor came closest to (or
# furthest over) its floor. `floor` is the measured one. Red rows exceed it, the first one is bold. `status` says
# `only_in_candidate` / `only_in_reference` where one side lacks a tensor (a missing reference tensor fails unless
# the candidate's `not_produced` metadata declares it or `allow_missing` is set); `note` names a layout mistake.

# %%
first = ld.first_divergence(table)
print(f"first divergent tensor: {first or 'none, every compared tensor is within its floor'}")
columns = ["prompt", "status", "shape", "cand_shape", "max_abs", "rel_l2", "cosine", "nmse_db", "floor", "exceeds",
           "note"]
display(styled(table[columns]))

# %% [markdown]
# ## 4. Isolated (teacher-forced) errors
#
# Every layer's tensors when the layer is fed the float32 reference's input: `rel_l2` against the float32
# reference (for `post_attention_residual` and `output`, of the layer's update `x - input`, so the residual stream
# does not dilute it), the teacher-forced reference's own `noise`, the `floor` and their `ratio`.

# %%
if isolated is not None:
    first_iso = ld.first_isolated(isolated)
    print(f"first isolated divergence: {first_iso or 'none'}")
    display(isolated.style.apply(lambda r: ["background-color: #f8d0d0" if r["exceeds"] else ""] * len(r), axis=1)
            .format("{:.3g}", subset=["rel_l2", "noise", "floor", "ratio"]))
else:
    print("no isolated run (a candidate dump has no layer to feed)")

# %% [markdown]
# ## 5. Heatmap: rel_l2 over layers x activation points
#
# Log colour scale: dark is close agreement (exact zeros are drawn at 1e-9), bright is large difference; red
# outlines mark cells over their floor. A bug shows up as a bright column or row starting at one cell; precision
# noise as a smooth drift with depth.

# %%
fig = plots.rel_l2_heatmap(rel_l2_grid(table), exceeds=ld.exceeds_grid(table),
                           title=f"{'candidate' if candidate else 'qwenlab'} vs reference: rel_l2 ({run.dtype})")
figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "rel_l2_heatmap")

# %% [markdown]
# ## 6. Logits
#
# Pooled over every position of every prompt, in the shape of `llama-perplexity --kl-divergence`: KL mean, max and
# percentiles, top-1 agreement with the reference, and delta-p (the reference's top-token probability minus the
# candidate's probability of that token). Each gated statistic beside the reference's own noise and its limit.

# %%
logits = ld.pooled_logits(diffs)
noise = ld.pooled_noise(diffs)
limits = gates.logits_limits(ld.logits_stats(noise) if noise else {}, run.dtype,
                             all(d.noise is None or d.noise.measured for d in diffs))
display(pd.Series(logits, name="logits vs reference", dtype=object).to_frame())
display(ld.logits_table(logits, noise, limits))

# %% [markdown]
# ## 7. Routing (MoE layers)
#
# For a MoE model (Qwen3-MoE), per MoE layer: the share of (token, slot) expert choices that agree with the reference
# (as a set per token: the order within the top-k does not matter), the tokens that chose another set, and of those
# how many flipped at a near-tie (the reference's logit margin there within the thresholds' routing margin plus twice
# the candidate's own router-logit error at that token: precision) or at a clear margin (a routing bug). Below, each
# flip with both sets of experts and the margins (doc/moe.md). A near-tie flip sends that token through other
# experts by rounding alone, so the tensors after it would differ by far more than rounding: the candidate's
# tensors above come from a run with the reference's experts forced at exactly those tokens (replace hooks at
# `mlp.router_ids` and `mlp.router_weights`), listed here; the routing rows keep what it chose on its own.

# %%
routing = ld.routing_table(diffs)
if routing is None:
    print("dense model: no MoE layer, no routing to compare")
else:
    display(routing)
    flips = ld.routing_flips(diffs)
    print(f"{len(flips)} tokens chose other experts than the reference" if len(flips) else
          "every token chose the reference's experts")
    if len(flips):
        display(flips)
    forced = pl.placement_metrics(run)["forced_routing"]
    print(f"forced to the reference's experts for the tensors after them: {forced}" if forced else
          "no near-tie flip to force")

# %% [markdown]
# ## 8. Planted bugs: does the table point at them?
#
# Each bug is planted for one capture of the first prompt (the model itself is left as it was) and diffed against
# the reference with the first prompt's measured floors:
#
# * RoPE theta 10x off: must surface at `layers.0.attn.q_rope`, the first tensor RoPE touches;
# * layer 1 skipping its per-head q RMSNorm: `layers.1.attn.q_norm`;
# * layers 1 and 2 holding each other's weights: the first tensor of layer 1 whose weights differ;
# * only 2 layers loaded, the rest left at zeros (the story's 2 of 36): `layers.2.input_layernorm`;
#
# and for a MoE model, in its first MoE layer (the last one for the experts):
#
# * the top-k weights not renormalised (or renormalised against the config): `mlp.router_weights`;
# * the router softmax taken over the tokens instead of the experts: `mlp.router_ids`, flips at clear margins;
# * the experts in reversed order (expert e holds expert E-1-e's weights): `mlp.experts`.

# %%
plant_bugs = plant_bugs and not candidate
if plant_bugs:
    localised, planted_results = run.localised, run.planted_results
    display(localised)
    shown_bug = next((name for name in planted_results if "q_norm" in name), next(iter(planted_results)))
    bug_table = planted_results[shown_bug].to_frame()
    fig = plots.rel_l2_heatmap(rel_l2_grid(bug_table), exceeds=ld.exceeds_grid(bug_table),
                               title=f"planted bug '{shown_bug}': rel_l2")
    nbutil.save_figure(fig, out_dir, NOTEBOOK, "planted_heatmap")
else:
    localised = pd.DataFrame(columns=["expected", "found", "localised"])
    print("planted-bug section skipped (plant_bugs is False, or the candidate is a dump: there is no model to plant "
          "a bug in)")

# %% [markdown]
# ## Verdict
#
# Pass when no tensor of any prompt is over its measured floor, no isolated error is over its floor, each logits
# statistic is within its limit, no MoE token chose other experts at a clear margin, and (when the section ran)
# every planted bug is localised at its expected tensor.

# %%
metrics, reasons = ld.verdict(thresholds, dtype=run.dtype, diffs=diffs, summary=summary, table=table, logits=logits,
                              localised=localised, gates=gates, isolated=isolated, plant_bugs=plant_bugs,
                              candidate=candidate, candidate_meta=run.candidate_meta,
                              config_hash=config.config_hash())
metrics |= pl.placement_metrics(run) | {"error_over_floor_by_layer": ratios.to_dict(orient="index")}
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
print(nbutil.verdict_line(record))
