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
# # 07 · Prompt playground
#
# **Question: when I type a prompt and watch tokens arrive, is what I see exactly what the decode path produces,
# and where does it part ways with the reference?**
#
# The other notebooks answer one question each on fixed inputs. Debugging is interactive: type a prompt, watch
# the tokens stream, stop a generation that runs away, look at the probabilities behind each token, then ask
# HF transformers for its opinion on the same prompt and look inside the layers where the two disagree.
#
# The playground below does all of that with ipywidgets:
#
# - **input**: a single raw prompt (encoded as-is) or a chat (system prompt, a persistent multi-turn session that
#   keeps its KV cache across turns, *Reset chat* starts over; *thinking* toggles the chat template's
#   `enable_thinking`);
# - **sampling**: temperature (0 = greedy), top-k (0 = off), top-p, max new tokens, seed; **decode** `kv` (cache)
#   or `replay` (recompute everything each token: the slow path kept for parity); **quantization** `none` (the
#   checkpoint as it is), `nvfp4` or `nvfp4-w4a4` (quantized at load, doc/nvfp4.md; the model reloads, and
#   *Compare*/*Inspect* then use transformers on the same NVFP4 numbers);
# - **Generate / Stop**: generation runs in a background thread, so the kernel stays responsive and *Stop* ends it
#   at the next token (stop reason `stopped`); text streams through the tokenizer's incremental decoder, so a
#   character split across tokens never shows half;
# - **readouts**: tokens, tok/s, elapsed, prefill, stop reason, host RSS and, on CUDA, allocated/reserved memory;
# - **per-token table**: each token's text, id, logprob and the top-5 alternatives (probabilities at temperature 1);
# - **Compare with reference**: HF transformers greedy on the same prompt, the first position where greedy tokens
#   or top-1 disagree, with both top-5 distributions there;
# - **Inspect layers**: captures both implementations on the prompt, shows the rel_l2 heatmap (layers x stages) and
#   the first divergent tensor;
# - **Export JSON**: conversation, settings and results under `<out_dir>/reports/`.
#
# Errors (empty prompt, a prompt longer than the context, a model that fails to load) show up in the status line.

# %% tags=["parameters"]
model_dir = ""  # checkpoint directory (HF layout); empty: the embedded tiny fixture
device = "cpu"
dtype = "float32"
out_dir = ""  # run folder of `qwenlab report`; empty: reports/scratch
thresholds_dir = ""  # folder of <notebook>.json thresholds; empty: data/thresholds
quant = ""  # nvfp4 | nvfp4-w4a4: load the model quantized (doc/nvfp4.md); empty: as the checkpoint is
device_map = ""  # qwenlab's layers across devices: balanced | 0:0-31,1:32-63 (doc/placement.md); empty: on device
demo_prompt = "Explain the KV cache in one sentence:"  # non-empty: run one generation through the button path
demo_max_new_tokens = 24
demo_decode_mode = "kv"  # kv | replay
demo_temperature = 0.0  # 0 means greedy
demo_seed = 0
demo_reference = True  # also press "Compare with reference" and "Inspect layers" in the demo

# %%
import os

import pandas as pd
from IPython.display import HTML, Image, display

from qwenlab.checks import nbutil
from qwenlab.checks import playground_demo as demo
from qwenlab.playground.app import Playground
from qwenlab.playground.core import figure_png

os.environ["HF_HUB_OFFLINE"] = "1"
NOTEBOOK = "07_prompt_playground"
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
pg = Playground(model_dir or None, device=device or None, dtype=dtype or None, out_dir=out_dir, quant=quant or None,
                device_map=device_map or None)
display(pg.widget)

# %% [markdown]
# ## Demo: one generation through the buttons' code path
#
# With `demo_prompt` set (the report keeps the default), the next cell does what a user does: it puts the prompt
# in the prompt box, sets the sliders, clicks **Generate** (the same handler a mouse click runs) and waits for the
# background thread. Then it shows the streamed text, the readouts and the first rows of the per-token table.
# The verdict at the end checks the streamed text against a direct `generate()` call with the same settings.

# %%
if demo_prompt:
    pg.prompt.value = demo_prompt
    pg.max_new_tokens.value = demo_max_new_tokens
    pg.decode_mode.value = demo_decode_mode
    pg.temperature.value = demo_temperature
    pg.seed.value = demo_seed
    pg.generate_button.click()
    pg.wait(timeout=600)
    print(pg.status)
    print("streamed text:", repr(pg.output_text))
    display(pd.Series(pg.readouts, name="readouts").to_frame())
    display(pg.token_table[["token", "id", "logprob", "p", "top5"]].head(12))
else:
    print("demo_prompt is empty: use the playground above")

# %% [markdown]
# ### How sure was the model?
#
# Blue: the probability (temperature 1) of the token that was chosen; grey: the model's top-1 probability. With
# greedy decoding they coincide; a sampled token shows as a blue point below the grey line. A run of low top-1
# probabilities is where a broken forward pass usually shows first (a flat distribution is noise, not language).

# %%
token_fig = demo.token_prob_figure(pg.token_table)
nbutil.save_figure(token_fig, out_dir, NOTEBOOK, "token_probs", key=True)
display(Image(figure_png(token_fig)))

# %% [markdown]
# ## Compare with the reference, inspect the layers
#
# The same two buttons, pressed programmatically: HF transformers greedy on the demo prompt (a disagreement is
# marked at the first generated position where the tokens or the top-1 differ, both top-5 distributions shown),
# then both implementations captured on the prompt and diffed. Read the heatmap row by row: dark is agreement
# (log10 rel_l2 near the dtype's noise floor), a bright cell is a stage that moved away from the reference, and
# the red box is the first divergent tensor in forward order, where a bug would be.

# %%
if demo_prompt and demo_reference and pg.result is not None:
    pg.compare_button.click()
    pg.wait(timeout=600)
    display(HTML(pg.compare_html.value))
    pg.inspect_button.click()
    pg.wait(timeout=600)
    print(pg.status)
    if pg.layer_figure is not None:
        nbutil.save_figure(pg.layer_figure, out_dir, NOTEBOOK, "layer_heatmap")
        display(Image(figure_png(pg.layer_figure)))

# %% [markdown]
# ## Export and verdict
#
# The export writes the conversation and settings as JSON (what the *Export JSON* button does). The verdict:
# the demo produced tokens, ended normally, and its streamed text equals `generate()`'s; in float32 the reference
# must agree token for token and every tensor must stay within its floor (thresholds in
# `data/thresholds/07_prompt_playground.json`).

# %%
if pg.result is not None:
    print("exported:", pg.save_json())
metrics, reasons = demo.verdict(pg, thresholds) if demo_prompt else ({"demo_ran": False}, [])
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
display(pd.Series(record["metrics"], name="metrics").to_frame())
print(nbutil.verdict_line(record))
