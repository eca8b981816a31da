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
# **Question: does every activation of the forward match the reference, and if not, where does it first go wrong?**
#
# Both implementations run the same prompts; every canonical activation (doc/dump-format.md: `embed`, per layer `input`,
# `input_layernorm`, `attn.q_proj` ... `output`, then `norm`, `logits`) is compared with max-abs, rel_l2, cosine and
# NMSE. A row is red when its rel_l2 exceeds the dtype's floor; the **first** red row in forward order is where a bug
# is, every later row only inherits it.
#
# With the parameter `candidate` set to a dump file written by any implementation (any language with a safetensors
# writer, see doc/), the candidate replaces qwenlab's forward: the reference is run on the dump's own `prompt_ids`
# and the same tables, heatmap and verdict follow.
#
# The second section is the notebook's own proof that the table works: known bugs are planted in copies of qwenlab's
# model and the diff must name each one's expected tensor.
#
# With `quant` set (or an NVFP4 `model_dir`), qwenlab's model is NVFP4 and the reference is transformers on the same
# NVFP4 numbers (`quant_reference`); the floors are then bfloat16's, as transformers dequantizes through bfloat16.
# Notebook 06 answers the NVFP4 questions in full (doc/nvfp4.md).
#
# Before anything loads, a plan says where the two models go (doc/placement.md): both on `device` (`resident`), one
# at a time through dumps on disk (`sequential`, when both do not fit), or each split across the visible GPUs by
# layers (`split`; qwenlab by `device_map`, the reference through accelerate). `placement` may force one; a request
# that cannot fit stops here with the numbers. The planted-bug section needs the resident model and is skipped
# otherwise.

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
device_map = ""  # qwenlab's layers across GPUs when split: balanced | 0:0-31,1:32-63; empty: from the plan

# %%
import os

import pandas as pd
from IPython.display import display

from qwenlab.activations import planted
from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import rel_l2_grid, styled
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks import nbutil, plots
from qwenlab.checks import placement as pl
from qwenlab.model.config import read_config
from qwenlab.model.tiny import resolve_model_dir

os.environ["HF_HUB_OFFLINE"] = "1"
NOTEBOOK = "03_layer_diffs"
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
floors = thresholds.get("floors") or None
model_path = resolve_model_dir(model_dir)
config = read_config(model_path)
plan = pl.plan_for(model_path, dtype, device, prompts, placement, device_map, quant)
print(f"model {model_path} · {config.num_hidden_layers} layers\n{plan.describe()}")

# %% [markdown]
# ## 1. Capture and diff
#
# One row per prompt: tokens, tensors compared, the first divergent tensor (None when none), the largest rel_l2, the
# tensor that came closest to its floor, and the logits statistics (KL(ref||cand) per position, top-1 agreement,
# delta-p of the reference's top token).

# %%
pl.reset_peaks()
run = pl.run_layer_diffs(model_path, dtype, device, prompts, plan, nbutil.resolve_out_dir(out_dir) / "dumps",
                         candidate=candidate, allow_missing=allow_missing, attention=attention or None, floors=floors,
                         quant=quant, quant_reference=quant_reference, unquantized_model=unquantized_model,
                         device_map=device_map)
diffs, cand_meta, ckpt, reference = run.diffs, run.candidate_meta, run.ckpt, run.reference
floors_dtype = "bfloat16" if ckpt is not None and getattr(ckpt.model, "quantization", None) else None
if candidate:
    display(ld.candidate_identity(cand_meta, config).to_frame("candidate"))
summary = ld.summary_frame(diffs)
display(summary)

# %% [markdown]
# ## 2. The full table
#
# Every tensor in forward order; for several prompts each row shows the prompt where that tensor came closest to (or
# furthest over) its floor. Red rows exceed the floor, the first one is bold. `status` says `only_in_candidate` /
# `only_in_reference` where one side lacks a tensor: a reference tensor the candidate lacks fails the verdict unless
# the candidate's `not_produced` metadata declares it or `allow_missing` is set. `note` names a layout mistake
# (`layout_mismatch`: the candidate's tensor matches after a permutation) or last-position-only logits.

# %%
table = ld.worst_frame(diffs)
first = ld.first_divergence(table)
print(f"first divergent tensor: {first or 'none, every compared tensor is within its floor'}")
columns = ["prompt", "status", "shape", "cand_shape", "max_abs", "rel_l2", "cosine", "nmse_db", "floor", "exceeds",
           "note"]
display(styled(table[columns]))

# %% [markdown]
# ## 3. Heatmap: rel_l2 over layers x activation points
#
# Log colour scale: dark is close agreement (exact zeros are drawn at 1e-9), bright is large difference; red
# outlines mark cells over their floor and the red line on the colour bar is the floor. A bug shows up as a bright
# column or row starting at one cell; numerical noise as a smooth drift with depth.

# %%
unique_floors = table["floor"].dropna().unique()
fig = plots.rel_l2_heatmap(rel_l2_grid(table), floor=unique_floors[0] if len(unique_floors) == 1 else None,
                           exceeds=ld.exceeds_grid(table),
                           title=f"{'candidate' if candidate else 'qwenlab'} vs reference: rel_l2 ({model_path.name})")
figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "rel_l2_heatmap", key=True)

# %% [markdown]
# ## 4. Logits
#
# Pooled over every position of every prompt, in the shape of `llama-perplexity --kl-divergence`: KL mean, max and
# percentiles, top-1 agreement with the reference, and delta-p (the reference's top-token probability minus the
# candidate's probability of that token).

# %%
logits = ld.pooled_logits(diffs)
display(pd.Series(logits, name="logits vs reference").to_frame())

# %% [markdown]
# ## 5. Planted bugs: does the table point at them?
#
# Each bug is planted in a deep copy of qwenlab's model (the loaded one is untouched) and diffed against the
# reference on the first prompt:
#
# * RoPE theta 10x off: must surface at `layers.0.attn.q_rope`, the first tensor RoPE touches;
# * layer 1 skipping its per-head q RMSNorm: `layers.1.attn.q_norm`;
# * layers 1 and 2 holding each other's weights: the first tensor of layer 1 whose weights differ,
#   `layers.1.input_layernorm`;
# * only 2 layers loaded, the rest left at zeros (the story's 2 of 36): `layers.2.input_layernorm`.

# %%
plant_bugs = plant_bugs and ckpt is not None and plan.placement == "resident"
if plant_bugs:
    first_prompt = diffs[0] if not candidate else None
    plant_ids = first_prompt.ids if first_prompt else ld.encode_prompt(run.tokenizer, prompts[0])
    plant_ref = first_prompt.reference if first_prompt else ld.reference_tensors(reference, plant_ids)
    bugs = planted.standard_bugs(ckpt.model)
    localised, planted_results = planted.localise(
        bugs, plant_ids, plant_ref, floors=floors, dtype=floors_dtype,
        capture=lambda m, ids: capture_qwenlab(m, ids, attention=attention or None))
    display(localised)
else:
    localised, planted_results = pd.DataFrame(columns=["expected", "found", "localised"]), {}
    print(f"planted-bug section skipped (plant_bugs is False, or placement {plan.placement}: the bugs are planted in "
          "copies of a resident model)")

# %% [markdown]
# The same heatmap for one planted bug (layer 1 without q_norm when the model has 2+ layers): everything before the
# bug is dark, the first outlined cell is the bug, and the difference then spreads to every later tensor.

# %%
if planted_results:
    shown_bug = next((b.name for b in bugs if "q_norm" in b.name), bugs[0].name)
    bug_table = planted_results[shown_bug].to_frame()
    fig = plots.rel_l2_heatmap(rel_l2_grid(bug_table), floor=unique_floors[0] if len(unique_floors) == 1 else None,
                               exceeds=ld.exceeds_grid(bug_table), title=f"planted bug '{shown_bug}': rel_l2")
    figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "planted_heatmap")

# %% [markdown]
# ## Verdict
#
# Pass when no prompt has a divergent tensor, the pooled logits KL mean is below the thresholds file's value for
# this dtype, and (when the section ran) every planted bug is localised at its expected tensor.

# %%
run_dtype = run.dtype if not candidate else diffs[0].result.dtype
metrics, reasons = ld.verdict(thresholds, dtype=run_dtype, diffs=diffs, summary=summary, table=table, logits=logits,
                              localised=localised, plant_bugs=plant_bugs, candidate=candidate,
                              candidate_meta=cand_meta, config_hash=config.config_hash(),
                              limit_dtype=floors_dtype)
metrics |= pl.placement_metrics(run)
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
print(nbutil.verdict_line(record))
