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
# # 02 · Embedding checks
#
# **Question: are the embedding rows the model runs on exactly the checkpoint's, and is the output head the one
# the checkpoint means?**
#
# The embedding lookup is the first thing a forward does and the easiest to get silently wrong: a table built by
# hand, a transposed or re-ordered tensor, a dtype cast in the wrong place, an lm_head that should be the embedding
# (tied) but was loaded or initialised separately. This notebook compares
#
# 1. the loaded rows for the prompt's ids with the tensor read **straight from the safetensors file**
#    (`safe_open`, not through the loader), bit for bit, and with the reference's `embed` activation;
# 2. the output head: tied checkpoints must use the very same storage, untied ones must match the file's
#    `lm_head.weight`;
# 3. the table as a whole: statistics and the distribution of row norms, with the prompt's tokens and the rows
#    the tokenizer never produces marked;
# 4. what "handcrafted" embeddings (random, one-hot, zeros: the second bug of the story in doc/story.md) look like in the
#    same numbers.

# %% tags=["parameters"]
model_dir = ""  # checkpoint directory (HF layout); empty: the embedded tiny fixture
device = "cpu"
dtype = "float32"
out_dir = ""  # run folder of `qwenlab report`; empty: reports/scratch
thresholds_dir = ""  # folder of <notebook>.json thresholds; empty: data/thresholds
quant = ""  # nvfp4 | nvfp4-w4a4: load the model quantized (doc/nvfp4.md); empty: as the checkpoint is
device_map = ""  # qwenlab's layers across devices: balanced | 0:0-31,1:32-63 (doc/placement.md); empty: on device
prompt = "chat:What is the capital of France? 你好 👋"  # raw text, or chat:<user turn>
handcrafted = ["random", "one_hot", "zeros"]  # stand-in tables to compare with the checkpoint's
seed = 1234  # for the random handcrafted table (not 0: the fixtures are generated from seed 0)

# %%
import os

import pandas as pd
from IPython.display import display

from qwenlab.activations.diff import floor_for
from qwenlab.activations.nvfp4_reference import load_reference_for
from qwenlab.checks import embedding_checks as ec
from qwenlab.checks import nbutil, plots
from qwenlab.checks.layer_diffs import encode_prompt
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir

os.environ["HF_HUB_OFFLINE"] = "1"
NOTEBOOK = "02_embedding_checks"
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
model_path = resolve_model_dir(model_dir)
ckpt = load(model_path, dtype, device, quant, device_map=device_map or None)
model, tok = ckpt.model, ckpt.tokenizer
reference = load_reference_for(ckpt)  # a quantized model: transformers on the same NVFP4 numbers
ids = encode_prompt(tok, prompt)
used_vocab = tok.vocab_size
file_table = ec.read_file_tensor(model_path, ec.EMBED)
print(f"model {model_path} · {model.dtype} on {model.device} · prompt {len(ids)} tokens")
print(f"file tensor {ec.EMBED}: {list(file_table.shape)} {file_table.dtype} · tokenizer produces ids < {used_vocab}")

# %% [markdown]
# ## 1. Prompt rows: loaded vs file vs reference
#
# The loaded rows must equal the file's rows cast to the run dtype **bitwise** (a lookup involves no arithmetic).
# The reference's `embed` activation is compared with the diff's relative-L2 floor for this dtype.

# %%
rows = ec.loaded_rows(model, ids)
vs_file = ec.rows_vs_file(rows, file_table, ids)
ref_embed = ec.reference_embed(reference, ids)
vs_ref = ec.tensor_metrics(rows, ref_embed)
embed_floor = floor_for("embed", str(model.dtype).removeprefix("torch."), model.config.num_hidden_layers,
                        thresholds.get("floors"))
display(pd.DataFrame({"vs file (safe_open)": vs_file, "vs reference embed": {**vs_ref, "floor": embed_floor}}))

# %% [markdown]
# ## 2. The output head
#
# `tie_word_embeddings` in config.json says whether lm_head *is* the embedding. Tied: the loaded lm_head must share
# the embedding's storage (not a copy that could drift) and the reference must tie too. Untied: lm_head must equal the
# file's own `lm_head.weight`.

# %%
head = ec.tied_head_check(model, model_path, reference)
display(pd.Series(head, name="lm_head").to_frame())

# %% [markdown]
# ## 3. The table: statistics and row norms
#
# Ids at or above the tokenizer's size (padding rows up to the config's vocab_size) are never produced by the
# tokenizer; their rows are counted separately. In the histogram (log counts), the black ticks along the bottom
# are the prompt's tokens and the dashed lines the stop tokens' rows. A prompt token far out in a tail, a spike
# at zero, or a table whose norms look nothing like a trained (or, for the fixture, seeded) table is worth a look.

# %%
norms = ec.row_norms(file_table)
stats = ec.table_stats(file_table, used_vocab, norms)
display(pd.Series(stats, name="embedding table").to_frame())
display(ec.prompt_rows_frame(tok, ids, norms, used_vocab).sort_values("row_norm").head(8))

# %%
stop_rows = {tok.id_to_token(i): norms[i].item() for i in tok.stop_ids if i < len(norms)}
fig = plots.row_norm_histogram(norms, used_vocab, rug=norms[ids].tolist(), labelled=stop_rows,
                               title=f"{model_path.name}: embedding row norms ({len(norms)} rows)")
figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "row_norms", key=True)

# %% [markdown]
# ## 4. Handcrafted embeddings, in the same metrics
#
# What the numbers above look like when the table is not the checkpoint's: a random table (an initializer's
# N(0, 0.02)), one-hot rows (row i = unit vector i mod hidden) and zeros. Each is compared with the file on the
# prompt's rows, and the model is run on the prompt with that table as its input embedding (lm_head kept) to show
# how far its predictions move: KL from the checkpoint run's next-token distributions and top-1 agreement.
# The checkpoint row is the baseline: zero difference, KL 0, agreement 1.

# %%
crafted = ec.handcrafted_comparison(model, file_table, ids, used_vocab, kinds=tuple(handcrafted), seed=seed)
display(crafted)

# %% [markdown]
# ## Verdict
#
# Pass when the prompt rows equal the file bitwise (max abs difference at most the thresholds file's
# `max_abs_vs_file`, 0), the reference's embed is within the floor, the head check holds, and the table is finite.

# %%
metrics, reasons = ec.verdict(thresholds, ids=ids, vs_file=vs_file, vs_reference=vs_ref, reference_floor=embed_floor,
                              head=head, stats=stats, handcrafted=crafted)
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
print(nbutil.verdict_line(record))
