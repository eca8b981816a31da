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
#   qwenlab:
#     runs_alone: 'it times decode steps for its latency figures, which other work on the device would move'
# ---

# %% [markdown]
# # 04 · Decode and KV-cache parity
#
# **Question: does generation with the KV cache produce exactly what recomputing everything would, and what the
# reference's `generate` produces, without the cost growing with every token?**
#
# A forward that matches layer by layer (notebook 03) can still decode wrongly: a cache written at the wrong position,
# RoPE offsets that restart at 0, a chat turn that re-uses stale cache entries, stop tokens that are never honoured.
# Or it can decode correctly but by replaying the whole sequence for every token, so long chats look hung (both from
# the story in doc/story.md). This notebook checks, greedily:
#
# 1. tokens of **kv** (cache) vs **replay** (no cache) vs transformers' `generate`, and the logits behind every step;
# 2. a 3-turn chat under the three strategies: one persistent cache (`session`), a fresh cache per turn (`rebuild`),
#    no cache (`replay`), with the tokens each turn re-used from the cache vs prefilled;
# 3. latency per token and per turn, kv vs replay (the plot);
# 4. stop tokens 151645 `<|im_end|>` / 151643 `<|endoftext|>` on prompts that make the model emit one;
# 5. in bfloat16/float16, the logits limits measured from the reference's own noise on these prompts.
#
# kv decoding runs on the `engine` parameter's engine: under `auto`, on a GPU, the CUDA-graph engine (the same forward,
# its one-token step captured over a static cache), so its tokens and logits are checked against the plain forward
# (replay) and the reference like any kv path; on the CPU, eager.
#
# With `quant` set (or an NVFP4 `model_dir`), the model is NVFP4 and the reference is transformers on the same NVFP4
# numbers (`quant_reference`), judged with the bfloat16 limits (doc/nvfp4.md).

# %% tags=["parameters"]
model_dir = ""  # checkpoint directory (HF layout); empty: the embedded tiny fixture
device = "cpu"
dtype = "float32"
out_dir = ""  # run folder of `qwenlab report`; empty: reports/scratch
thresholds_dir = ""  # folder of <notebook>.json thresholds; empty: data/thresholds
quant = ""  # nvfp4 | nvfp4-w4a4: load the model quantized (doc/nvfp4.md); empty: as the checkpoint is
device_map = ""  # qwenlab's layers across devices: balanced | 0:0-31,1:32-63 (doc/placement.md); empty: on device
prompts = [
    "The quick brown fox",
    "chat:Write a haiku about the sea.",
    "chat:Name three prime numbers and explain why they are prime.",
]  # raw text, or chat:<user turn>
max_new_tokens = 32
chat_turns = ["Hi! Who are you?", "Tell me a short story about a robot.", "Thanks. Summarise it in one line."]
chat_new_tokens = 24
chat_enable_thinking = False  # False: the template's empty think block makes the session crop its cache each turn
latency_prompt_tokens = 256  # length of the filler prompt for the per-step latency plot
latency_new_tokens = 96
latency_positions = [64, 256, 1024, 2048]  # context lengths for the cost-per-token curve
stop_prompts = ["Hello<|im_end|>", "The end.<|endoftext|>"]  # raw prompts expected to make the model emit a stop id
stop_new_tokens = 8
engine = "auto"  # kv decoding: auto (the CUDA graph engine on a GPU, else eager), graph or eager
measure_floors = True  # bfloat16/float16: measure the per-step logits limits from the reference's own noise
quant_reference = "quantized"  # a quantized model against: quantized (transformers, same NVFP4 numbers) | unquantized
unquantized_model = ""  # quant_reference unquantized with an NVFP4 model_dir: the checkpoint it came from

# %%
import os

from IPython.display import display

import qwenlab as ql
from qwenlab.checks import decode_parity as dp
from qwenlab.checks import nbutil, plots
from qwenlab.checks.layer_diffs import encode_prompt

os.environ["HF_HUB_OFFLINE"] = "1"
NOTEBOOK = "04_decode_kv_parity"
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
ckpt = ql.load(ql.LoadSpec.from_params(model_dir, dtype, device, quant, device_map))
model, tok = ckpt.model, ckpt.tokenizer
run_dtype = str(model.dtype).removeprefix("torch.")
reference = ql.load_reference(ckpt, quant_reference, unquantized_model or None)
stop_ids = tok.stop_ids
# one engine for every kv decode below, all its caches of one length: the graph engine compiles its step once
cache_len = dp.cache_length(model, sequences=[latency_prompt_tokens + latency_new_tokens], positions=latency_positions)
kv_engine = ql.Engine(model, engine, min_cache_len=cache_len)
print(f"model {ckpt.path} · {run_dtype} on {model.device} · stop ids {stop_ids} · kv engine {kv_engine.kind}"
      + (f" ({kv_engine.note})" if kv_engine.note else ""))

# %% [markdown]
# ## 1. Greedy tokens: kv vs replay vs transformers `generate`
#
# Each prompt is decoded three ways with the same stop ids. The logits behind every generated token are recorded
# inside qwenlab's `generate` (kv and replay) and recomputed by one reference forward over the final sequence;
# per step they are compared by rel_l2 and KL (up to the first token where the sequences part, after which the
# contexts differ). `min_ref_top2_margin` is the smallest gap between the reference's two best logits, and
# `margin_at_mismatch_*` that gap at the step where two sequences part: in low precision a flip at a near-tie is
# noise, a flip at a large margin is a bug. (The table is transposed: one column per prompt.)

# %%
prompt_ids = {label: encode_prompt(tok, p) for label, p in zip(prompts, prompts)}
greedy, steps = dp.greedy_parity(model, reference, prompt_ids, max_new_tokens, stop_ids, engine=kv_engine)
display(greedy.drop(columns=["kv_ids", "reference_ids"]).T)
for label, row in greedy.iterrows():
    print(f"{label!r}: {tok.decode(row['kv_ids'])!r}")

# %% [markdown]
# ## 2. Multi-turn chat: persistent cache vs rebuild vs replay
#
# The same three user turns under each strategy. `reused_tokens` are the conversation tokens the session's cache
# already held and could keep (the common prefix of the cached tokens and the newly rendered conversation),
# `prefill_tokens` the ones run through the model at the start of the turn. With thinking off, the generation
# prompt ends in an empty `<think>` block that the next turn's rendering of the history leaves out, so the session
# must crop its cache back to the common prefix every turn: the case where a stale cache would show. Every turn's
# tokens must equal `replay`'s, and so must the logits behind them (max rel_l2 / KL per turn). In low precision a
# turn may part from replay's at a near-tie (judged like a greedy mismatch, by its margin): the later turns then
# carry another answer in their history, `same_context_as_replay` is False, and they are not compared.

# %%
chat = dp.chat_parity(model, tok, chat_turns, chat_new_tokens, enable_thinking=chat_enable_thinking,
                      max_len=cache_len, engine=kv_engine)
display(chat.drop(columns=["ids", "text"]).set_index(["strategy", "turn"]))

# %% [markdown]
# ## 3. Latency: per token and per turn
#
# Left: milliseconds per generated token along one generation (`latency_new_tokens` tokens after a
# `latency_prompt_tokens`-token prompt, no stop tokens). kv runs one token through the model per step; replay runs the
# whole sequence every step (dotted lines, right axis). Right: the cost of one new token against the context length
# (median of a few steps at each of `latency_positions`, log-log): replay grows with the sequence, which is how chat
# turns "got slower until they looked hung", kv stays nearly flat. On a tiny model fixed per-call overhead hides
# much of the growth at short contexts; on a real checkpoint replay's line is much steeper.
# Timings on a shared CPU are noisy (isolated spikes are other processes); they are recorded, not judged.

# %%
latency = dp.latency_profile(model, dp.filler_ids(tok, latency_prompt_tokens), latency_new_tokens, engine=kv_engine)
by_position = dp.latency_by_position(model, tok, latency_positions, engine=kv_engine)
display(dp.latency_summary(latency))
display(by_position.pivot(index="position", columns="mode", values="ms_per_token"))
fig = plots.latency_plot(latency, by_position)
figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "latency", key=True)

# %% [markdown]
# Wall time per chat turn (section 2), per strategy: replay recomputes the conversation for every token, rebuild
# re-prefills the whole history once per turn, session prefills only the new part.

# %%
fig = plots.turn_plot(chat[["strategy", "turn", "turn_s"]])
figure_path = nbutil.save_figure(fig, out_dir, NOTEBOOK, "turn_latency")

# %% [markdown]
# ## 4. Stop tokens
#
# Each prompt is generated once with no stop ids (it runs on to `stop_new_tokens`) and once with the tokenizer's stop
# ids. A case is *exercised* when the free run emits a stop id; it is *honoured* when the stopped run ends exactly
# there, stop token included, with `stop_reason == "stop_token"`. The reference's `generate` (with the same
# `eos_token_id`s) must stop at the same place. With the tiny fixture, text ending in `<|im_end|>` makes it emit
# 151645 at once and `<|endoftext|>` 151643. A last, synthetic case stops on the token that section 1's last prompt
# emits at step 2, so the stop logic is exercised even by weights that never emit a real stop token (random
# weights of a real shape). The stop ids in use must include 151645 and 151643.

# %%
stop_prompt_ids = {p: encode_prompt(tok, p) for p in stop_prompts}
synthetic = (prompts[-1], prompt_ids[prompts[-1]])
stops = dp.stop_cases(model, stop_prompt_ids, stop_ids, stop_new_tokens, reference, synthetic=synthetic,
                      engine=kv_engine)
display(stops)

# %% [markdown]
# ## 5. Floors: the reference's own noise
#
# In bfloat16 (or float16) two correct implementations part by rounding, and the more so the deeper the model: a
# fixed limit tuned on a small model false-alarms on a large one. So in low precision the per-step logits limits
# are measured on these prompts: the reference's step logits in the run dtype (kept from section 1) against the
# same reference in float32, teacher-forced on the reference's own tokens. The verdict allows a multiple of that
# noise (thresholds file, `noise`; doc/floors.md). The run-dtype reference is freed first so the float32 one has
# room; when it still does not fit beside qwenlab's model (a 30B model on one GPU), qwenlab's weights are released
# too (nothing after this section runs the model; not for an NVFP4 model, whose quantized reference is exported from
# it). When it does not fit even then, the fixed limits apply and the line below says so. A float32 run has no
# lower-precision noise and keeps the float32 limits; so does a float32 NVFP4 run, whose reference dequantizes
# through bfloat16 (the fixed bfloat16 limits, doc/nvfp4.md).

# %%
limit_dtype = dp.limit_dtype(model)  # bfloat16 for an NVFP4 model: doc/nvfp4.md
ref_steps = dp.reference_steps(reference, prompt_ids, greedy)
del reference  # the float32 reference loads next
noise, floors_note = dp.measure_step_noise(ckpt, prompt_ids, greedy, ref_steps, quant_reference,
                                           unquantized_model or None,
                                           enabled=measure_floors and limit_dtype == run_dtype,
                                           release_model=True)  # nothing below runs qwenlab's model
print(floors_note)
if noise is not None:
    display(noise)

# %% [markdown]
# ## Verdict
#
# Pass when
#
# * kv, replay and the reference produce the same tokens on every prompt, and every chat strategy produces replay's
#   tokens; where two sequences part at a near-tie of the baseline (top-2 logit margin at most the flip margin:
#   the thresholds file's `flip_margin` for this dtype, 0 in float32, 1 logit in bfloat16; with the floors of
#   section 5 measured, at least twice the largest shift of the top-2 margin between the reference in this dtype
#   and in float32, since on large logits one rounding step alone is several units) the flip is counted but not
#   judged (in low precision a flip at a near-tie is rounding noise; a flip at a clear margin is a bug);
# * the logits behind every token agree: max rel_l2 and the worst per-sequence mean KL within this dtype's limits,
#   measured in section 5 in low precision (greedy prompts and chat turns alike). On a MoE model a token produced
#   where a router sat at a near-tie (its k-th and (k+1)-th logits within one rounding step) can take another
#   expert by rounding alone, which moves that token's logits far more than rounding: such tokens are counted
#   (`routing_near_tie_steps`, the largest rel_l2 among them) and left out of these numbers; a token mismatch at
#   one is explained like one at a near-tie of the top-2 logits (doc/moe.md). So that every step is still judged, a
#   MoE model is also run once over the reference's own tokens with its near-tie expert flips forced to the
#   reference's (as notebook 03 does; `forced_*` columns), and those step logits count in the numbers above. The
#   noise of section 5 is measured the same way: the float32 reference takes the run-dtype reference's experts
#   where it flipped at a near-tie (`forced_steps` in its table), and every step counts;
# * the session re-uses its cache after turn 1;
# * every exercised stop case is honoured, and at least `min_stop_cases_exercised` were exercised.

# %%
metrics, reasons = dp.verdict(thresholds, dtype=run_dtype, greedy=greedy, chat=chat, chat_turns=chat_turns,
                              latency=latency, by_position=by_position, stops=stops, stop_ids=stop_ids,
                              limit_dtype=limit_dtype, noise=noise)
print(f"logits judged at {metrics['judged_steps']} of {metrics['compared_steps']} compared steps" + (
    "" if metrics["judged_steps"] or not metrics["compared_steps"] else
    ": none, every step up to each parting was at a routing near-tie; the verdict rests on the tokens alone"))
metrics["graph_captures"] = kv_engine.captures  # where the graph engine's compile time went (doc/performance.md)
if kv_engine.captures:
    print(f"graph engine: {len(kv_engine.captures)} captures (cache lengths "
          f"{sorted({c['max_len'] for c in kv_engine.captures})}), "
          f"{sum(c['seconds'] for c in kv_engine.captures):.1f} s compiling and capturing: "
          f"{sum(c['kernels_s'] for c in kv_engine.captures):.1f} s choosing kernels, "
          f"{sum(c['first_call_s'] for c in kv_engine.captures):.1f} s in first calls of the step, "
          f"{sum(c['graphs_compiled'] for c in kv_engine.captures)} graphs compiled)")
print(f"flip margin {metrics['step_limits']['flip_margin']:.3g}: the thresholds file's for {limit_dtype}"
      + (f", or {thresholds['noise']['max_margin_shift']['multiple']:g}x the largest top-2 margin shift of section 5 "
         "if larger" if metrics["step_limits"]["measured"] else ""))
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
print(nbutil.verdict_line(record))
