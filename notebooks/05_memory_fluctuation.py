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
#     runs_alone: 'it records the device''s memory in use, to which other notebooks would add theirs'
# ---

# %% [markdown]
# # 05 · Memory fluctuation
#
# **Question: when memory swings between chat turns, is it the caching allocator keeping freed blocks, a real
# lifetime bug (tensors kept alive, the history re-prefilled every turn), or a run that crashes?**
#
# The story in doc/story.md: one GPU, a multi-turn chat, nvidia-smi swinging between 96 and 116 GiB, and repeated
# runs crashing now and then. This notebook separates the causes:
#
# 1. **Load**: the weights the memory model predicts from config.json against what the load left resident.
# 2. **Timeline** of one scripted chat, sampled at every phase boundary (load, prefill, each decode step, turn end):
#    on CUDA *allocated* (live tensors) vs *reserved* (what the caching allocator holds) vs *device used* (what
#    nvidia-smi shows); on CPU the process RSS/USS instead. Phases are shaded, each turn's peak is marked.
# 3. **empty_cache after each turn**, on vs off: the reserved memory it gives back (on CPU a no-op: said so).
# 4. **Fragmentation**: reserved minus allocated, and the allocator's inactive split blocks (CUDA only).
# 5. **KV cache**: predicted bytes (2 x layers x kv_heads x head_dim x bytes per token) against the measured cache,
#    preallocated and grown, over context length; on CUDA also the prefill workspace.
# 6. **Strategies**: per-turn latency, tokens prefilled and peak memory for a persistent session cache, a cache
#    rebuilt every turn, and full replay without cache.
# 7. **Stress matrix**: strategies x iterations of the same chat; a baseline that climbs from iteration to
#    iteration is a leak, an exception is a crash (the same code as `qwenlab stress`).
#
# The verdict gates on the leak, crashes and measured-vs-predicted thresholds in
# `data/thresholds/05_memory_fluctuation.json`. doc/memory.md explains how to read each figure.

# %% tags=["parameters"]
model_dir = ""  # checkpoint directory (HF layout); empty: the embedded tiny fixture
device = "cpu"
dtype = "float32"
out_dir = ""  # run folder of `qwenlab report`; empty: reports/scratch
thresholds_dir = ""  # folder of <notebook>.json thresholds; empty: data/thresholds
quant = ""  # nvfp4 | nvfp4-w4a4: load the model quantized (doc/nvfp4.md); empty: as the checkpoint is
device_map = ""  # qwenlab's layers across devices: balanced | 0:0-31,1:32-63 (doc/placement.md); empty: on device
strategies = "session,rebuild,replay"  # conversation strategies to compare and stress
turns = 6  # user turns of data/chat_script.json (at most 6)
max_new_tokens = 16  # per turn, in the timeline, empty-cache and strategy sections
iterations = 3  # stress matrix iterations per strategy (qwenlab stress defaults to 10)
stress_max_new_tokens = 4  # per turn in the stress matrix
preallocate = True  # KV cache preallocated to max length (True) or grown per step (False)
empty_cache_strategy = "rebuild"  # the strategy run twice for the empty_cache on/off comparison
kv_lengths = "64,256,1024"  # context lengths for predicted vs measured KV bytes
interval_s = 0.0  # > 0: also sample on a background thread at this interval (seconds)
expandable_segments = ""  # "on" / "off": PYTORCH_CUDA_ALLOC_CONF, honoured only before CUDA initialises
history_path = ""  # CUDA: write a torch.cuda.memory snapshot of the timeline chat here (pytorch.org/memory_viz)

# %%
import contextlib

import matplotlib.pyplot as plt
import pandas as pd

try:
    from IPython.display import display
except ImportError:  # run as a plain script (scripts/gpu_memory_evidence.sh without jupyter)
    display = print

from qwenlab.checks import memory_fluctuation as mf
from qwenlab.checks import nbutil
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory import device as mem_device
from qwenlab.memory import frame as mem_frame
from qwenlab.memory import plots as mem_plots
from qwenlab.memory import predict, scripted_chat, stress, stress_matrix
from qwenlab.memory.tracker import MemoryTracker
from qwenlab.model.loader import load
from qwenlab.model.tiny import resolve_model_dir

NOTEBOOK = "05_memory_fluctuation"
allocator = mem_device.apply_allocator_config(None if not expandable_segments else expandable_segments == "on")
thresholds = nbutil.load_thresholds(thresholds_dir, NOTEBOOK)
model_path = resolve_model_dir(model_dir)
system, script = scripted_chat.load_script()
chat_turns = script[:turns]
params = SamplingParams(max_new_tokens=max_new_tokens)
strategy_list = [s.strip() for s in strategies.split(",") if s.strip()]
MiB = 2 ** 20
pd.set_option("display.width", 160)


def show(fig, name, key=False):
    if fig is not None:
        nbutil.save_figure(fig, out_dir, NOTEBOOK, name, key=key)
        display(fig)
        plt.close(fig)


print(f"allocator config: {allocator}")

# %% [markdown]
# ## 1. Load: predicted vs measured weights
#
# The tracker brackets the load as a phase. *Parameter storage* sums the bytes of every distinct tensor storage
# the model holds (a tied head shares the embedding), *parameter count* sums their elements; both must equal the
# memory model's formula. On CUDA the allocated bytes the load left behind are the third measurement: anything
# above the prediction is a copy the loader kept alive. The second table is what the same config needs in other
# dtypes (NVFP4: 4.5 bits per projection weight, embeddings and norms in bfloat16).

# %%
tracker = MemoryTracker(device, interval_s=interval_s or None)
with tracker.phase("load"):
    ckpt = load(model_path, dtype, device, quant, device_map=device_map or None)
model = ckpt.model
cuda = mem_device.is_cuda(model.device)
load_frame = tracker.frame()
weights = predict.weights_check(model, mem_frame.phase_delta(load_frame, "load", "cuda_allocated"),
                                     thresholds["weights_rel_error_max"])
display(weights)
display((pd.DataFrame({d: predict.weight_bytes(model.config, d) for d in ("float32", "bfloat16", "nvfp4")})
         / MiB).round(2).rename_axis("MiB"))
print(f"{model_path.name}: {model.dtype} on {model.device}; load phase RSS delta "
      f"{mem_frame.phase_delta(load_frame, 'load', 'rss') / MiB:.1f} MiB (weights, tokenizer and imports)")

# %% [markdown]
# ## 2. Timeline of one chat (session strategy)
#
# Read it left to right: the grey band is the load, each turn is an orange prefill followed by a blue decode.
# On CUDA, *allocated* should rise by the KV cache at the first turn and then stay flat between turns; *reserved*
# above it is memory the caching allocator keeps for reuse (not a leak); *device used* above reserved is the CUDA
# context and anything outside torch. The red triangles are each turn's peak (allocated since the phase began;
# on CPU the kernel's VmHWM). A staircase in allocated at turn ends is a lifetime bug.

# %%
recording = (mem_device.record_history(history_path, device=model.device) if history_path
             else contextlib.nullcontext())
with recording:
    timeline_rows, _ = scripted_chat.run_chat(ckpt, scripted_chat.Policy("session", preallocate), chat_turns,
                                              params, system=system, tracker=tracker)
tracker.stop()
timeline = tracker.frame()
show(mem_plots.plot_timeline(timeline, tracker.spans_frame()), "timeline", key=True)
display(pd.DataFrame(timeline_rows)[["turn", "prefill_tokens", "reused_tokens", "new_tokens", "context_tokens",
                                     "latency_s", "peak_bytes", "end_bytes", "kv_cache_bytes"]])

# %% [markdown]
# ## 3. Emptying the allocator cache after each turn
#
# The same chat twice with the `rebuild` strategy (a fresh KV cache every turn, the most allocator churn), once
# leaving the cache alone and once calling `torch.cuda.empty_cache()` after every turn. On CUDA the solid lines are
# reserved memory at turn end, the dotted ones allocated: empty_cache lowers reserved toward allocated (what
# nvidia-smi sees drops) but cannot lower allocated, and the next turn pays for fresh cudaMallocs. On CPU there is
# no caching allocator to empty: the call does nothing and both lines show host RSS.

# %%
empty_cache_frame = mf.compare_empty_cache(ckpt, chat_turns, params, system=system,
                                                        strategy=empty_cache_strategy, preallocate=preallocate)
if not cuda:
    print("CPU run: torch.cuda.empty_cache() does nothing here (host memory is glibc malloc's, not torch's cache)")
show(mem_plots.plot_empty_cache(empty_cache_frame, cuda), "empty_cache")
display(empty_cache_frame.pivot(index="turn", columns="empty_cache",
                                values=["end_bytes", "end_reserved_bytes", "peak_bytes"]))

# %% [markdown]
# ## 4. Fragmentation: reserved minus allocated
#
# Over the timeline of section 2: bytes the allocator holds but no tensor uses, and of those the *inactive split*
# bytes, pieces of larger blocks that cannot be handed back until the whole block is free. A large, growing
# inactive split is fragmentation; a flat gap is the cache doing its job. `expandable_segments` (parameter, only
# honoured before CUDA initialises: in a fresh kernel or `qwenlab stress --fresh-process`) is the allocator's
# remedy. On CPU: n/a.

# %%
frag = mem_frame.fragmentation(timeline)
if frag.empty:
    print("n/a on CPU: no caching allocator, so no reserved-vs-allocated gap to show")
else:
    show(mem_plots.plot_fragmentation(timeline), "fragmentation")
    display((frag[["cached_unused", "cuda_inactive_split"]].describe().loc[["mean", "max"]] / MiB).round(1))

# %% [markdown]
# ## 5. KV cache: predicted vs measured against context length
#
# The line is the formula; circles a preallocated cache of that many positions, squares a grown cache filled by a
# prefill of that many tokens. On CPU `KVCache.nbytes()` against the formula still checks the layout (a cache of
# the wrong dtype, a missing GQA reduction or a per-turn copy shows up as an offset); on CUDA the crosses are the
# allocated bytes the cache left behind, and `workspace_ratio` compares the prefill's peak above resident memory
# with the memory model's workspace estimate.

# %%
kv = predict.measure_kv(model, [int(x) for x in kv_lengths.split(",")])
per_token = predict.kv_bytes_per_token(model.config, model.dtype)
show(mem_plots.plot_kv(kv, per_token), "kv_predicted_vs_measured")
display(kv)

# %% [markdown]
# ## 6. Strategies: latency and memory per turn
#
# `session` prefills only what each turn adds; `rebuild` prefills the whole history into a new cache every turn;
# `replay` recomputes the whole sequence for every generated token. The middle panel counts the positions that went
# through the model in each turn. Latency and that count grow with the history for the last two (the "turns got slower until they looked hung" of the story); peak memory shows what
# each strategy allocates at once (rebuild briefly holds the old and the new cache).

# %%
strategies_frame = mf.compare_strategies(ckpt, strategy_list, chat_turns, params, system=system,
                                                      preallocate=preallocate)
show(mem_plots.plot_strategies(strategies_frame), "strategies")
display(strategies_frame.pivot(index="turn", columns="strategy",
                               values=["latency_s", "prefill_tokens", "tokens_computed", "peak_bytes"]))

# %% [markdown]
# ## 7. Stress matrix
#
# Every strategy `iterations` times in this process (`qwenlab stress` runs the same code, 10 iterations by default,
# and can start a fresh process per iteration). After each iteration the session is dropped, garbage collected
# and (CUDA) synchronised; the baseline is what is left: CUDA allocated bytes, or RSS on CPU. After the warm-up
# iteration it must stay flat: growth beyond the threshold is a leak. Any exception is recorded as a crash.

# %%
stress_result = stress_matrix.run_matrix(
    stress_matrix.StressConfig(ckpt.spec, strategies=tuple(strategy_list), iterations=iterations, turns=turns,
                               max_new_tokens=stress_max_new_tokens, preallocate=preallocate,
                               leak_threshold_mb=mf.leak_threshold(thresholds, model.device)),
    ckpt=ckpt)
print(stress.format_table(stress_result))
print(stress.verdict_line(stress_result))
show(mem_plots.plot_baselines(stress_result), "stress_baselines")

# %% [markdown]
# ## Verdict
#
# Regressed when the weights or the KV cache differ from the memory model by more than the thresholds, when (CUDA)
# the prefill workspace exceeds the estimate by more than its factor, when a strategy's baseline grows after
# warm-up (a leak) or when any stress iteration crashed.

# %%
metrics, reasons = mf.verdict(thresholds, device=model.device, weights=weights, kv=kv, timeline=timeline,
                              empty_cache_frame=empty_cache_frame, strategies_frame=strategies_frame,
                              stress=stress_result)
metrics |= {"model": str(model_path), "dtype": str(model.dtype), "config_hash": model.config.config_hash(),
            "allocator": allocator}
record = nbutil.write_metrics(out_dir, NOTEBOOK, metrics, reasons)
print(nbutil.verdict_line(record))
