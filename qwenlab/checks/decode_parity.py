"""Decode and KV-cache parity (notebook 04): kv vs replay vs transformers generate, per-step logits, chat strategies,
latency per token and per turn, and stop tokens."""
from __future__ import annotations

import pandas as pd
import torch

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import logits_metrics
from qwenlab.activations.forced_routing import capture_routing_forced, force_near_tie_flips
from qwenlab.activations.names import split_name
from qwenlab.activations.nvfp4_reference import load_reference_for
from qwenlab.activations.reference import capture_reference, reference_generate
from qwenlab.activations.routing import DEFAULT_MARGIN, is_routing
from qwenlab.checks.fit import load_if_fits, out_of_memory, reference_fit, release, several_gpus
from qwenlab.checks.nbutil import check_max, check_min
from qwenlab.generation.chat import ChatSession
from qwenlab.generation.decode import Generation, generate
from qwenlab.generation.engine import MIN_POOLED_LEN, cache_length_for
from qwenlab.generation.sampling import SamplingParams
from qwenlab.memory.plan import visible_devices
from qwenlab.model.dtypes import dtype_name
from qwenlab.sequences import first_difference

REQUIRED_STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
CHAT_MAX_LEN = 2048  # positions of a chat session's cache
LATENCY_STEPS = 4  # decode steps timed at each latency position


class StepLogits(list):
    """generate()'s on_logits callback: keeps the logits each generated token was chosen from (float32, CPU)."""

    def __call__(self, logits: torch.Tensor):
        self.append(logits.detach().float().cpu())


def generate_recorded(model, prompt_ids, params: SamplingParams, mode: str = "kv", stop_ids=(),
                      cache=None, engine: str = "auto") -> tuple[Generation, torch.Tensor]:
    """generate() as is, plus the [n_tokens, vocab] logits behind each generated token. No tokenizer is passed,
    so only the given stop_ids stop it (stop_ids=() really means none)."""
    steps = StepLogits()
    gen = generate(model, list(prompt_ids), params, stop_ids=tuple(stop_ids), mode=mode, cache=cache, engine=engine,
                   on_logits=steps)
    return gen, torch.stack(steps)


def step_metrics(cand: torch.Tensor, ref: torch.Tensor) -> pd.DataFrame:
    """Per step: rel_l2 of the logits, KL(ref||cand), whether the argmax agrees, the reference's top-2 margin, and
    how far the candidate moves that margin (margin_shift: |gap(ref) - gap(cand)| between the reference's two best
    tokens; a token flips between two runs only where the margin is within such shifts)."""
    n = min(len(cand), len(ref))
    if n == 0:
        return pd.DataFrame(columns=["rel_l2", "kl", "top1_match", "ref_top2_margin", "margin_shift"])
    c, r = cand[:n].double(), ref[:n].double()
    lm = logits_metrics(c, r)
    top2 = r.topk(2, dim=-1)
    pair = c.gather(-1, top2.indices)
    gap_ref, gap_cand = top2.values[:, 0] - top2.values[:, 1], pair[:, 0] - pair[:, 1]
    return pd.DataFrame({"rel_l2": ((c - r).norm(dim=-1) / r.norm(dim=-1)).tolist(), "kl": lm["kl_per_position"],
                         "top1_match": lm["top1_match_per_position"], "ref_top2_margin": gap_ref.tolist(),
                         "margin_shift": (gap_ref - gap_cand).abs().tolist()})


def margin_at(steps: pd.DataFrame, at: int | None) -> float | None:
    """The baseline's top-2 logit margin at the step where two token sequences part (None: they do not, or the
    step is beyond what both produced, e.g. one side stopped)."""
    if at is None or at >= len(steps):
        return None
    return float(steps["ref_top2_margin"].iloc[at])


def explained(at: int | None, margin: float | None, flip_margin: float, routing_tie: bool = False) -> bool:
    """Identical, or parted at a near-tie (margin <= flip_margin), or (MoE) at a token whose experts were chosen at a
    router near-tie (routing_near_ties): a low-precision flip rather than a bug."""
    return at is None or (margin is not None and margin <= flip_margin) or bool(routing_tie)


def limit_dtype(model) -> str:
    """Whose limits judge this model: its dtype's, bfloat16's for an NVFP4 model (doc/nvfp4.md)."""
    return "bfloat16" if model.quantization else dtype_name(model.dtype)


def near_ties(router_logits: dict[str, torch.Tensor], start: int, n_steps: int, top_k: int,
              margin: float) -> list[dict | None]:
    """router_logits: {`layers.{i}.mlp.router_logits`: [.., T, experts]} of one forward. For each of n_steps tokens
    produced at positions start, start + 1, ...: {"layer", "gap"} of the MoE layer whose gap between its k-th and
    (k+1)-th router logit is smallest there, when that gap is at most `margin`, else None."""
    found: list[dict | None] = []
    for step in range(n_steps):
        best = None
        for name, logits in router_logits.items():
            top = logits.reshape(-1, logits.shape[-1])[start + step].double().topk(top_k + 1).values
            gap = (top[top_k - 1] - top[top_k]).item()
            if gap <= margin and (best is None or gap < best["gap"]):
                best = {"layer": split_name(name)[0], "gap": gap}
        found.append(best)
    return found


ROUTER_LOGITS = ["layers.*.mlp.router_logits"]
FORCED_STEP_TENSORS = ["layers.*.mlp.router_ids", *ROUTER_LOGITS, "logits"]  # what forced_reference_steps reads


def routing_margin(model, margin: float | None = None) -> float:
    """`margin`, or the routing margin of the model's limit dtype: about one rounding step of a router logit."""
    return DEFAULT_MARGIN[limit_dtype(model)] if margin is None else margin


@torch.inference_mode()
def routing_near_ties(model, prompt_ids, gen_ids, margin: float | None = None) -> list[dict | None]:
    """A MoE model's tokens produced at a router near-tie (near_ties on one teacher-forced forward of qwenlab's model
    over prompt + gen_ids[:-1]; margin: the routing margin of limit_dtype, about one rounding step of a router
    logit, data/thresholds/03_layer_diffs.json). At such a token the kv path, replay and the reference can choose
    different experts by rounding alone, and another expert moves that token's logits far more than rounding does
    (doc/moe.md). Dense models: all None, nothing runs."""
    cfg = model.config
    if not cfg.is_moe or not gen_ids:
        return [None] * len(gen_ids)
    logits = capture_qwenlab(model, list(prompt_ids) + list(gen_ids[:-1]), include=ROUTER_LOGITS)
    return near_ties(logits, len(prompt_ids) - 1, len(gen_ids), cfg.num_experts_per_tok,
                     routing_margin(model, margin))


@torch.inference_mode()
def forced_reference_steps(model, ref_model, prompt_ids, gen_ids, margin: float | None = None) -> pd.DataFrame | None:
    """A MoE model's step logits against the reference's on the reference's own sequence, with qwenlab's experts
    forced to the reference's wherever they flipped at a near-tie (qwenlab.activations.forced_routing, as notebook 03
    does): one teacher-forced forward each, so every step is judged like with like, where the decode comparisons
    leave out the steps at a router near-tie (on a deep MoE model that can be all of them). A flip at a clear margin
    is not forced and shows. None for a dense model or no tokens."""
    if not model.config.is_moe or not gen_ids:
        return None
    seq, read = list(prompt_ids) + list(gen_ids[:-1]), FORCED_STEP_TENSORS
    ref = capture_reference(ref_model, seq, include=read)
    forced, _ = capture_routing_forced(model, seq, capture_qwenlab(model, seq, include=read), ref,
                                       routing_margin(model, margin), include=read)
    start = len(prompt_ids) - 1
    return step_metrics(forced["logits"][start:start + len(gen_ids)].float(),
                        ref["logits"][start:start + len(gen_ids)].float())


def judged(steps: pd.DataFrame, ties: list) -> pd.DataFrame:
    """The steps a verdict judges: those not produced at a routing near-tie (all of them for a dense model)."""
    keep = [ties[i] is None if i < len(ties) else True for i in range(len(steps))]
    return steps[keep]


def _max(values: pd.Series, had_steps: bool) -> float:
    """The largest judged value; 0 when every step was at a routing near-tie, NaN when there was no step at all."""
    return float(values.max()) if len(values) else (0.0 if had_steps else float("nan"))


def _mean(values: pd.Series, had_steps: bool) -> float:
    return float(values.mean()) if len(values) else (0.0 if had_steps else float("nan"))


def compare_modes(model, prompt_ids, params: SamplingParams, stop_ids=(), cache=None, engine: str = "auto") -> dict:
    """kv (optionally into a given cache; `engine` decodes it) vs replay on one prompt: tokens and the logits of
    every step."""
    kv, kv_logits = generate_recorded(model, prompt_ids, params, "kv", stop_ids, cache, engine)
    rp, rp_logits = generate_recorded(model, prompt_ids, params, "replay", stop_ids)
    at = first_difference(kv.ids, rp.ids)
    shared = len(kv.ids) if at is None else at + 1  # steps with the same context on both sides
    steps = step_metrics(kv_logits[:shared], rp_logits[:shared])
    return {"kv": kv, "replay": rp, "kv_logits": kv_logits, "replay_logits": rp_logits, "identical": at is None,
            "first_mismatch": at, "margin_at_mismatch": margin_at(steps, at), "steps": steps,
            "max_rel_l2": steps["rel_l2"].max() if len(steps) else float("nan"),
            "max_kl": steps["kl"].max() if len(steps) else float("nan")}


@torch.inference_mode()
def reference_step_logits(ref_model, prompt_ids, gen_ids) -> torch.Tensor:
    """The reference's logits behind each generated token, from one forward over prompt + generated[:-1]."""
    seq = list(prompt_ids) + list(gen_ids[:-1])
    logits = ref_model(input_ids=torch.tensor([seq], device=ref_model.device), use_cache=False).logits[0]
    start = len(prompt_ids) - 1
    return logits[start:start + len(gen_ids)].float().cpu()


def greedy_parity(model, ref_model, prompts: dict, max_new_tokens: int, stop_ids=(),
                  engine: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame]:
    """prompts: label -> ids. -> (one row per prompt, one row per prompt x step). Greedy, same stop ids everywhere;
    kv decodes with `engine` (the CUDA graph under auto on a GPU), replay is always the plain forward. A MoE model's
    tokens produced at a routing near-tie (routing_near_ties) are listed but left out of the max/mean columns the
    verdict judges; `*_all` columns keep every step."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    rows, step_frames = [], []
    for label, ids in prompts.items():
        modes = compare_modes(model, ids, params, stop_ids, engine=engine)
        kv = modes["kv"]
        hf = reference_generate(ref_model, ids, max_new_tokens, stop_ids)
        at_ref = first_difference(kv.ids, hf)
        shared = len(kv.ids) if at_ref is None else at_ref + 1
        vs_ref = step_metrics(modes["kv_logits"][:shared], reference_step_logits(ref_model, ids, hf[:shared]))
        ties = routing_near_ties(model, ids, kv.ids)
        vs_replay_j, vs_ref_j = judged(modes["steps"], ties), judged(vs_ref, ties)
        forced = forced_reference_steps(model, ref_model, ids, hf)  # MoE: every step judged, flips forced
        steps = modes["steps"].add_prefix("kv_vs_replay_").join(vs_ref.add_prefix("kv_vs_reference_"), how="outer")
        steps.insert(0, "prompt", label)
        steps.insert(1, "step", range(len(steps)))
        steps["routing_near_tie_layer"] = [ties[i]["layer"] if i < len(ties) and ties[i] else None
                                           for i in range(len(steps))]
        step_frames.append(steps)
        tie_at = {col: at is not None and at < len(ties) and ties[at] is not None
                  for col, at in (("replay", modes["first_mismatch"]), ("reference", at_ref))}
        excused = steps[steps["routing_near_tie_layer"].notna()]
        rows.append({"prompt": label, "prompt_tokens": len(ids), "kv_engine": kv.engine, "kv_tokens": len(kv.ids),
                     "replay_tokens": len(modes["replay"].ids), "reference_tokens": len(hf),
                     "kv_equals_replay": modes["identical"], "kv_equals_reference": at_ref is None,
                     "first_mismatch_replay": modes["first_mismatch"], "first_mismatch_reference": at_ref,
                     "margin_at_mismatch_replay": modes["margin_at_mismatch"],
                     "margin_at_mismatch_reference": margin_at(vs_ref, at_ref),
                     "routing_tie_at_mismatch_replay": tie_at["replay"],
                     "routing_tie_at_mismatch_reference": tie_at["reference"],
                     "stop_reason": kv.stop_reason,
                     "max_rel_l2_kv_vs_replay": _max(vs_replay_j["rel_l2"], len(modes["steps"]) > 0),
                     "max_kl_kv_vs_replay": _max(vs_replay_j["kl"], len(modes["steps"]) > 0),
                     "max_rel_l2_kv_vs_reference": _max(vs_ref_j["rel_l2"], len(vs_ref) > 0),
                     "max_kl_kv_vs_reference": _max(vs_ref_j["kl"], len(vs_ref) > 0),
                     "mean_kl_kv_vs_replay": _mean(vs_replay_j["kl"], len(modes["steps"]) > 0),
                     "mean_kl_kv_vs_reference": _mean(vs_ref_j["kl"], len(vs_ref) > 0),
                     "max_rel_l2_kv_vs_replay_all": modes["max_rel_l2"], "max_rel_l2_kv_vs_reference_all":
                     vs_ref["rel_l2"].max(), "routing_near_tie_steps": len(excused),
                     "routing_near_tie_max_rel_l2": float(excused[["kv_vs_replay_rel_l2", "kv_vs_reference_rel_l2"]]
                                                          .max().max()) if len(excused) else 0.0,
                     "min_ref_top2_margin": vs_ref["ref_top2_margin"].min(),
                     "compared_steps": len(modes["steps"]) + len(vs_ref) + (len(forced) if forced is not None else 0),
                     "forced_steps": len(forced) if forced is not None else 0,
                     "forced_max_rel_l2_vs_reference": _max(forced["rel_l2"], True) if forced is not None else
                     float("nan"),
                     "forced_max_kl_vs_reference": _max(forced["kl"], True) if forced is not None else float("nan"),
                     "forced_mean_kl_vs_reference": _mean(forced["kl"], True) if forced is not None else float("nan"),
                     "judged_steps": len(vs_replay_j) + len(vs_ref_j), "kv_ids": kv.ids, "reference_ids": hf})
    return pd.DataFrame(rows).set_index("prompt"), pd.concat(step_frames, ignore_index=True)


def reference_steps(ref_model, prompts: dict, greedy: pd.DataFrame) -> dict[str, dict[str, torch.Tensor]]:
    """Per prompt, what step_noise needs from the run-dtype reference once it is freed (host memory): over prompt +
    the tokens it generated[:-1], its logits and, for a MoE model, its router ids and logits (the experts the float32
    reference is forced to where it flips at a near-tie)."""
    read = FORCED_STEP_TENSORS if getattr(ref_model.config, "model_type", "") == "qwen3_moe" else ["logits"]
    return {label: capture_reference(ref_model, list(ids) + list(greedy.loc[label, "reference_ids"][:-1]),
                                     include=read) for label, ids in prompts.items()}


def step_noise(truth_model, prompts: dict, greedy: pd.DataFrame, ref_steps: dict[str, dict[str, torch.Tensor]],
               margin: float = DEFAULT_MARGIN["bfloat16"]) -> pd.DataFrame:
    """The reference's own precision noise on notebook 04's sequences: per prompt, its step logits in the run dtype
    (ref_steps) against the same model in float32 (truth_model), teacher-forced on the tokens the reference
    generated: the largest rel_l2, the mean and largest KL(truth || reference), the largest shift of the top-2 margin
    (step_metrics' margin_shift: how far rounding alone moves the gap a greedy choice rests on), argmax
    disagreements. On a MoE model the float32 run takes the run-dtype reference's experts wherever it flipped at a
    near-tie (gap <= margin, the run dtype's routing margin; force_near_tie_flips), as qwenlab's forced steps do
    against the reference: otherwise another expert, not rounding, would be measured, and on a deep MoE model every
    step has such a flip.
    `forced_steps` counts the steps whose token had experts forced in some layer."""
    rows = []
    for label, ids in prompts.items():
        gen = greedy.loc[label, "reference_ids"]
        run, seq, start = ref_steps[label], list(ids) + list(gen[:-1]), len(ids) - 1
        moe = any(map(is_routing, run))  # reference_steps kept the run's routing
        include = FORCED_STEP_TENSORS if moe else ["logits"]
        truth, forced = capture_reference(truth_model, seq, include=include), {}
        if moe and len(gen):
            truth, forced = force_near_tie_flips(
                lambda f: capture_reference(truth_model, seq, include=include, routing=f), truth, run, margin)
        window = slice(start, start + len(gen))
        steps = step_metrics(run["logits"][window].float(), truth["logits"][window].float())
        tokens = {t for rows_ in forced.values() for t in rows_}
        rows.append({"prompt": label, "steps": len(steps), "max_rel_l2": _max(steps["rel_l2"], False),
                     "mean_kl": _mean(steps["kl"], False), "max_kl": _max(steps["kl"], False),
                     "max_margin_shift": _max(steps["margin_shift"], False),
                     "top1_disagreements": int((~steps["top1_match"].astype(bool)).sum()),
                     "forced_steps": sum(start <= t < start + len(gen) for t in tokens)})
    return pd.DataFrame(rows).set_index("prompt")


def measure_step_noise(ckpt, prompts: dict, greedy: pd.DataFrame, ref_steps: dict[str, dict[str, torch.Tensor]],
                       quant_reference: str = "quantized", unquantized_model=None,
                       enabled: bool = True, release_model: bool = False) -> tuple[pd.DataFrame | None, str]:
    """Notebook 04's floors: loads the reference in float32 (for an NVFP4 model, the one `quant_reference` names) and
    returns (step_noise table, note), or (None, why not) for a float32 run, `enabled` False, or a float32 reference
    that does not fit (the fixed limits then apply). Free the run-dtype reference first: ref_steps has what it gave.
    On several GPUs the float32 reference is spread over them (accelerate). release_model: when the float32
    reference does not fit beside qwenlab's model, move that model's weights to the meta device (it is unusable
    afterwards: for a caller with nothing left to run on it) and try again; not for an NVFP4 model, whose quantized
    reference is exported from it."""
    model = ckpt.model
    dtype = dtype_name(model.dtype)
    if not enabled:
        return None, "floors not measured (measure_floors off, or a float32 NVFP4 run): the fixed limits apply"
    if dtype in ("float32", "float64"):
        return None, "a float32 run has no lower-precision noise to measure: the float32 limits apply"
    device, margin, spread = model.device, routing_margin(model), several_gpus(model.device)
    release(device)
    longest = max(len(ids) + len(greedy.loc[label, "reference_ids"]) for label, ids in prompts.items())

    def fit_now(beside: str = "qwenlab's model"):
        return reference_fit("the float32 reference", model.config, "float32", longest, visible_devices(str(device)),
                             spread, beside)

    fit, freed = fit_now(), ""
    if not fit.fits and release_model and model.quantization is None:
        model.to("meta")  # the weights go; nothing the caller runs after the floors needs them
        release(device)
        fit, freed = fit_now("nothing (qwenlab's model released)"), "; qwenlab's model was released first to make room"
    truth, why = load_if_fits(fit, lambda **kw: load_reference_for(ckpt, quant_reference, unquantized_model,
                                                                   dtype=torch.float32, device=device, **kw), device)
    if truth is None:
        return None, f"floors not measured: {why}; the fixed limits apply"
    try:
        noise = step_noise(truth, prompts, greedy, ref_steps, margin)
    except torch.OutOfMemoryError as e:
        return None, (f"floors not measured: the float32 reference does not fit ({out_of_memory(e)}); "
                      "the fixed limits apply")
    finally:
        truth = None
        release(device)
    return noise, (f"floors measured: transformers in {dtype} against itself in float32 on these prompts "
                   f"({int(noise['steps'].sum())} steps){freed}")


def step_limits(thresholds: dict, dtype: str, noise: pd.DataFrame | None) -> tuple[dict, bool]:
    """The per-step logits limits at `dtype` -> (limits, measured). With the reference's noise measured on these
    prompts (a low-precision run): noise.<stat>.multiple x the worst prompt's noise + noise.<stat>.absolute[dtype]
    (doc/floors.md); else the fixed per-dtype limits of the thresholds file (float32: no noise to measure).
    The flip margin (a token mismatch at a baseline top-2 margin up to it is a precision flip) is then the larger
    of the file's `flip_margin` for the dtype and noise.max_margin_shift.multiple x the largest margin shift
    measured: on a model whose logits are large (hundreds on random weights) one rounding step of the logits alone
    is several units, far above a fixed margin tuned on small logits."""
    limits = dtype_limits(thresholds, dtype)
    if noise is None or dtype in ("float32", "float64") or not len(noise) or "noise" not in thresholds:
        return limits, False
    for key, stat in (("max_step_logits_rel_l2", "max_rel_l2"), ("max_step_kl_mean", "mean_kl")):
        gate = thresholds["noise"][stat]
        worst = float(noise[stat].max())
        if worst != worst:  # no step to measure on
            return dtype_limits(thresholds, dtype), False
        limits[key] = gate["multiple"] * worst + gate["absolute"].get(dtype, gate["absolute"]["bfloat16"])
    gate = thresholds["noise"].get("max_margin_shift")
    if gate and "max_margin_shift" in noise and noise["max_margin_shift"].notna().any():
        limits["flip_margin"] = max(limits["flip_margin"], gate["multiple"] * float(noise["max_margin_shift"].max()))
    return limits, True


def chat_parity(model, tokenizer, user_turns: list[str], max_new_tokens: int,
                strategies=("replay", "rebuild", "session"), system: str | None = None,
                enable_thinking: bool | None = None, max_len: int = CHAT_MAX_LEN,
                engine: str = "auto") -> pd.DataFrame:
    """The same conversation under each strategy, compared turn by turn with the first strategy's: the tokens, and
    the logits behind every token (max rel_l2 and KL, up to the first token where the two part; a turn whose history
    already differs from the first strategy's, because an earlier turn parted, is not compared). A MoE model's tokens
    produced at a routing near-tie of the first strategy's turn are left out of the max/mean (routing_near_ties)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    rows, logits, prompt_ids = [], {}, {}
    for strategy in strategies:
        session = ChatSession(model, tokenizer, system=system, enable_thinking=enable_thinking, strategy=strategy,
                              max_len=max_len, engine=engine)
        for k, text in enumerate(user_turns, start=1):
            steps = StepLogits()
            turn = session.send(text, params, on_logits=steps)
            gen = turn.generation
            logits[strategy, k] = torch.stack(steps)
            prompt_ids[strategy, k] = list(gen.prompt_ids)
            rows.append({"strategy": strategy, "turn": k, "engine": gen.engine, "prompt_tokens": len(gen.prompt_ids),
                         "reused_tokens": turn.reused_tokens, "prefill_tokens": turn.prefill_tokens,
                         "new_tokens": len(gen.ids), "stop_reason": gen.stop_reason,
                         "prefill_ms": gen.prefill_s * 1000, "turn_s": gen.prefill_s + sum(gen.step_s),
                         "ids": gen.ids, "text": gen.text})
    frame = pd.DataFrame(rows)
    base = strategies[0]
    base_ids = frame[frame["strategy"] == base].set_index("turn")["ids"]
    frame["same_tokens_as_" + base] = [ids == base_ids[t] for ids, t in zip(frame["ids"], frame["turn"])]
    ties = {turn: routing_near_ties(model, prompt_ids[base, turn], base_ids[turn]) for turn in base_ids.index}
    # after a turn parts (at a near-tie, say), the later turns carry another answer in their history: their logits
    # come from another context and are not compared; the parting turn itself is judged
    frame[f"same_context_as_{base}"] = [prompt_ids[s, t] == prompt_ids[base, t]
                                        for s, t in zip(frame["strategy"], frame["turn"])]
    stats = []
    for strategy, turn, ids, same in zip(frame["strategy"], frame["turn"], frame["ids"],
                                         frame[f"same_context_as_{base}"]):
        if not same:
            stats.append({"first_mismatch": None, "margin_at_mismatch": None, "routing_tie_at_mismatch": False,
                          "compared_steps": 0, "judged_steps": 0, "routing_near_tie_steps": 0,
                          f"max_rel_l2_vs_{base}": float("nan"), f"max_kl_vs_{base}": float("nan"),
                          f"mean_kl_vs_{base}": float("nan")})
            continue
        at = first_difference(ids, base_ids[turn])
        shared = len(ids) if at is None else at + 1
        steps = step_metrics(logits[strategy, turn][:shared], logits[base, turn][:shared])
        kept, had = judged(steps, ties[turn]), len(steps) > 0
        stats.append({"first_mismatch": at, "margin_at_mismatch": margin_at(steps, at),
                      "compared_steps": len(steps), "judged_steps": len(kept),
                      "routing_tie_at_mismatch": at is not None and at < len(ties[turn]) and ties[turn][at] is not None,
                      "routing_near_tie_steps": len(steps) - len(kept),
                      f"max_rel_l2_vs_{base}": _max(kept["rel_l2"], had), f"max_kl_vs_{base}": _max(kept["kl"], had),
                      f"mean_kl_vs_{base}": _mean(kept["kl"], had)})
    return pd.concat([frame, pd.DataFrame(stats, index=frame.index)], axis=1)


def latency_profile(model, prompt_ids, max_new_tokens: int, modes=("kv", "replay"),
                    engine: str = "auto") -> pd.DataFrame:
    """Per generated token and mode: the position it was computed at and the ms it took (no stop tokens, so every
    run is max_new_tokens long). The final step only samples (no forward) and is left out."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    rows = []
    for mode in modes:
        gen = generate(model, list(prompt_ids), params, stop_ids=(), mode=mode, engine=engine)
        rows += [{"mode": mode, "step": k, "position": len(prompt_ids) + k, "step_ms": seconds * 1000,
                  "prefill_ms": gen.prefill_s * 1000} for k, seconds in enumerate(gen.step_s[:-1])]
    return pd.DataFrame(rows)


def latency_summary(steps: pd.DataFrame, edge: int = 10) -> pd.DataFrame:
    """Per mode: prefill, mean and median ms per token, first vs last `edge` steps (medians, robust to spikes)."""
    rows = []
    for mode, group in steps.groupby("mode", sort=False):
        ms = group.sort_values("step")["step_ms"]
        first, last = ms.head(edge).median(), ms.tail(edge).median()
        rows.append({"mode": mode, "tokens": len(ms) + 1, "prefill_ms": group["prefill_ms"].iloc[0],
                     "mean_ms_per_token": ms.mean(), "median_ms_per_token": ms.median(), "median_first_ms": first,
                     "median_last_ms": last, "tok_per_s": 1000 / ms.median()})
    return pd.DataFrame(rows).set_index("mode")


def latency_by_position(model, tokenizer, positions, steps: int = LATENCY_STEPS, modes=("kv", "replay"),
                        engine: str = "auto") -> pd.DataFrame:
    """Cost of one new token at each context length, from short generate() runs on filler prompts of that length:
    the median of `steps` decode steps (the prefill is recorded apart). Positions beyond the model's context are
    dropped. Replay's cost grows with the context, kv's should not (much)."""
    limit = model.config.max_position_embeddings - steps - 1
    params = SamplingParams(temperature=0.0, max_new_tokens=steps + 1)
    rows = []
    for position in [p for p in positions if 0 < p <= limit]:
        ids = filler_ids(tokenizer, position)
        for mode in modes:
            gen = generate(model, ids, params, stop_ids=(), mode=mode, engine=engine)
            rows.append({"mode": mode, "position": position, "ms_per_token": 1000 * pd.Series(gen.step_s[:-1]).median(),
                         "prefill_ms": gen.prefill_s * 1000})
    return pd.DataFrame(rows)


def growth(by_position: pd.DataFrame) -> dict:
    """Per mode: ms per token at the longest context over ms per token at the shortest."""
    out = {}
    for mode, group in by_position.groupby("mode"):
        group = group.sort_values("position")
        out[mode] = group["ms_per_token"].iloc[-1] / group["ms_per_token"].iloc[0]
    return out


def _stop_case(model, label, ids, stop_ids, params, ref_model, engine: str = "auto") -> dict:
    free = generate(model, ids, params, stop_ids=(), engine=engine)
    stopped = generate(model, ids, params, stop_ids=stop_ids, engine=engine)
    at = next((i for i, t in enumerate(free.ids) if t in stop_ids), None)
    exercised = at is not None
    expected = free.ids[: at + 1] if exercised else free.ids
    honoured = stopped.ids == expected and (stopped.stop_reason == "stop_token") == exercised
    row = {"prompt": label, "stop_ids": list(stop_ids), "stop_id": free.ids[at] if exercised else None,
           "at_step": at, "exercised": exercised, "with_stops_ids": stopped.ids,
           "with_stops_reason": stopped.stop_reason, "without_stops_ids": free.ids,
           "without_stops_reason": free.stop_reason, "runs_on_without_stops": len(free.ids) > len(stopped.ids),
           "honoured": honoured}
    if ref_model is not None:
        hf = reference_generate(ref_model, ids, params.max_new_tokens, stop_ids)
        row["reference_ids"] = hf
        row["reference_agrees"] = hf == stopped.ids
    return row


def stop_cases(model, prompts: dict, stop_ids, max_new_tokens: int = 8, ref_model=None,
               synthetic: tuple[str, list[int]] | None = None, synthetic_step: int = 2,
               engine: str = "auto") -> pd.DataFrame:
    """prompts: label -> ids. Each prompt runs once with no stop ids (free run) and once with `stop_ids`.
    A case is exercised when the free run emits a stop id; honoured when the stopped run is exactly the free run up
    to and including that token, with stop_reason 'stop_token'. The reference's generate must stop at the same place.
    `synthetic` (label, ids) adds a case whose only stop id is the token its free run emits at `synthetic_step`: it
    exercises the stop logic whatever the weights (a random-weight model may never emit 151645 or 151643)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    stop_ids = tuple(stop_ids)
    rows = [_stop_case(model, label, ids, stop_ids, params, ref_model, engine) for label, ids in prompts.items()]
    if synthetic is not None and synthetic_step < max_new_tokens - 1:
        label, ids = synthetic
        token = generate(model, ids, params, stop_ids=(), engine=engine).ids[synthetic_step]
        rows.append(_stop_case(model, f"{label} (synthetic: stop on {token})", ids, (token,), params, ref_model,
                               engine))
    return pd.DataFrame(rows).set_index("prompt")


FILLER = "The quick brown fox jumps over the lazy dog while the band plays on. "


def cache_length(model, *, chat: int = CHAT_MAX_LEN, sequences=(), positions=(), steps: int = LATENCY_STEPS) -> int:
    """One cache length for every kv decode of notebook 04, so its graph engine compiles the step once: the length
    the engine would pool (cache_length_for, from 512) for the longest of the chat sessions' `chat` positions, each
    of `sequences` (prompt + new tokens) and each latency position plus its steps (latency_by_position's)."""
    need = max([chat, *sequences, *(p + steps + 1 for p in positions)])
    return cache_length_for(need, MIN_POOLED_LEN, model.config.max_position_embeddings)


def filler_ids(tokenizer, n_tokens: int, text: str = FILLER) -> list[int]:
    """Exactly n_tokens ids of repeated plain text: a long prompt for latency measurements."""
    unit = tokenizer.encode(text)
    return (unit * (n_tokens // max(len(unit), 1) + 1))[:n_tokens]


def _worst(*columns) -> float:
    """The largest value over the columns, NaN (a column with nothing measured) left out; NaN when all are."""
    values = [float(v) for col in columns for v in col if v == v]
    return max(values) if values else float("nan")


def _none(value):
    return None if value is None or pd.isna(value) else int(value)


def parity_numbers(greedy: pd.DataFrame, chat: pd.DataFrame, flip_margin: float) -> dict:
    """The verdict's numbers. A token mismatch is 'explained' when the sequences part at a near-tie of the baseline
    (top-2 logit margin <= flip_margin, a low-precision flip); only unexplained ones fail a run."""
    def column(frame, name, default=False):  # MoE columns: absent from frames made before they existed
        return list(frame[name]) if name in frame else [default] * len(frame)

    greedy_pairs = [(at, m, tie) for col in ("replay", "reference")
                    for at, m, tie in zip(greedy[f"first_mismatch_{col}"], greedy[f"margin_at_mismatch_{col}"],
                                          column(greedy, f"routing_tie_at_mismatch_{col}"))]
    base = chat["strategy"].iloc[0]
    others = chat[chat["strategy"] != base]
    chat_pairs = list(zip(others["first_mismatch"], others["margin_at_mismatch"],
                          column(others, "routing_tie_at_mismatch")))

    def unexplained(pairs):
        return sum(not explained(_none(at), None if pd.isna(m) else float(m), flip_margin, bool(tie))
                   for at, m, tie in pairs)

    per_prompt_bad = ~(greedy["kv_equals_replay"] & greedy["kv_equals_reference"])
    return {
        "token_mismatches": int(per_prompt_bad.sum()),
        "unexplained_token_mismatches": unexplained(greedy_pairs),
        "chat_mismatches": int((~others[f"same_tokens_as_{base}"]).sum()),
        "unexplained_chat_mismatches": unexplained(chat_pairs),
        "step_logits_max_rel_l2": _worst(greedy["max_rel_l2_kv_vs_replay"], greedy["max_rel_l2_kv_vs_reference"],
                                         others[f"max_rel_l2_vs_{base}"],
                                         column(greedy, "forced_max_rel_l2_vs_reference", float("nan"))),
        "step_logits_max_kl": _worst(greedy["max_kl_kv_vs_replay"], greedy["max_kl_kv_vs_reference"],
                                     others[f"max_kl_vs_{base}"],
                                     column(greedy, "forced_max_kl_vs_reference", float("nan"))),
        "step_logits_worst_mean_kl": _worst(greedy["mean_kl_kv_vs_replay"], greedy["mean_kl_kv_vs_reference"],
                                            others[f"mean_kl_vs_{base}"],
                                            column(greedy, "forced_mean_kl_vs_reference", float("nan"))),
        "forced_steps": int(sum(column(greedy, "forced_steps", 0))),
        # steps whose logits were compared (up to each parting) and those the three numbers above judge: a MoE
        # model's steps at a routing near-tie are left out, and on a deep one that can be all of them
        "compared_steps": int(sum(column(greedy, "compared_steps", 0)) + sum(column(others, "compared_steps", 0))),
        "judged_steps": int(sum(column(greedy, "judged_steps", 0)) + sum(column(others, "judged_steps", 0)) +
                            sum(column(greedy, "forced_steps", 0))),
        # MoE: tokens produced at a routing near-tie, left out of the three numbers above, and their largest rel_l2
        "routing_near_tie_steps": int(sum(column(greedy, "routing_near_tie_steps", 0)) +
                                      sum(column(others, "routing_near_tie_steps", 0))),
        "routing_near_tie_max_rel_l2": float(max(column(greedy, "routing_near_tie_max_rel_l2", 0.0), default=0.0)),
    }


def dtype_limits(thresholds: dict, dtype: str) -> dict:
    """The thresholds given per dtype ({"float32": ..., "bfloat16": ...}), at this dtype."""
    return {key: value[dtype] for key, value in thresholds.items() if isinstance(value, dict) and key != "noise"}


def greedy_metrics(greedy: pd.DataFrame) -> dict:
    return {
        "prompts": len(greedy),
        "kv_engine": sorted(set(greedy["kv_engine"])) if "kv_engine" in greedy else [],
        "new_tokens": greedy["kv_tokens"].tolist(),
        "kv_equals_replay": bool(greedy["kv_equals_replay"].all()),
        "kv_equals_reference": bool(greedy["kv_equals_reference"].all()),
        "min_ref_top2_margin": float(greedy["min_ref_top2_margin"].min()),
    }


def session_metrics(chat: pd.DataFrame, chat_turns: list[str]) -> dict:
    """The session strategy must re-use its cache from turn 2 on."""
    session = chat[chat["strategy"] == "session"]
    return {
        "chat_turns": len(chat_turns),
        "session_reuse_ok": bool((session[session["turn"] > 1]["reused_tokens"] > 0).all()),
        "session_reused_tokens": session["reused_tokens"].tolist(),
        "session_prefill_tokens": session["prefill_tokens"].tolist(),
        "chat_total_s": chat.groupby("strategy")["turn_s"].sum().to_dict(),
    }


def latency_metrics(latency: pd.DataFrame, by_position: pd.DataFrame) -> dict:
    """Timings: recorded, not judged."""
    table = latency_summary(latency)
    return {
        "latency": table.to_dict(orient="index"),
        "kv_ms_per_token": float(table.loc["kv", "median_ms_per_token"]),
        "replay_ms_per_token": float(table.loc["replay", "median_ms_per_token"]),
        "replay_over_kv": float(table.loc["replay", "median_ms_per_token"] / table.loc["kv", "median_ms_per_token"]),
        "ms_per_token_by_position": by_position.pivot(index="position", columns="mode",
                                                      values="ms_per_token").to_dict(),
        "growth_longest_over_shortest": growth(by_position),
    }


def stop_metrics(stops: pd.DataFrame, stop_ids) -> dict:
    """A stop case fails when it was exercised but not honoured by qwenlab, or the reference stopped elsewhere."""
    return {
        "stop_cases": len(stops),
        "stop_cases_exercised": int(stops["exercised"].sum()),
        "stop_failures": int((stops["exercised"] & ~(stops["honoured"] & stops["reference_agrees"])).sum()),
        "stop_ids_seen": sorted({int(i) for i in stops["stop_id"].dropna()}),
        "stop_ids_configured": list(stop_ids),
    }


def verdict(thresholds: dict, *, dtype: str, greedy: pd.DataFrame, chat: pd.DataFrame, chat_turns: list[str],
            latency: pd.DataFrame, by_position: pd.DataFrame, stops: pd.DataFrame, stop_ids,
            limit_dtype: str | None = None, noise: pd.DataFrame | None = None) -> tuple[dict, list[str]]:
    """Notebook 04's metrics and the thresholds they exceed (an empty list passes). limit_dtype: whose limits apply
    (default `dtype`; an NVFP4 model is judged with the bfloat16 ones, doc/nvfp4.md). noise: step_noise's table,
    when the reference's own noise was measured: the per-step logits limits are then measured ones (step_limits)."""
    limits, measured = step_limits(thresholds, limit_dtype or dtype, noise)
    numbers = parity_numbers(greedy, chat, limits["flip_margin"])
    metrics = {
        **numbers,
        "dtype": dtype,
        "step_limits": {"measured": measured, "max_step_logits_rel_l2": limits["max_step_logits_rel_l2"],
                        "max_step_kl_mean": limits["max_step_kl_mean"], "flip_margin": limits["flip_margin"]},
        "step_noise": None if noise is None else noise.to_dict(orient="index"),
        **greedy_metrics(greedy),
        **session_metrics(chat, chat_turns),
        **latency_metrics(latency, by_position),
        **stop_metrics(stops, stop_ids),
    }
    reasons: list[str] = []
    check_max(reasons, "prompts where kv / replay / reference tokens differ (not at a near-tie)",
              numbers["unexplained_token_mismatches"], thresholds["max_token_mismatches"])
    check_max(reasons, "chat turns whose tokens differ from replay (not at a near-tie)",
              numbers["unexplained_chat_mismatches"], thresholds["max_chat_mismatches"])
    how = " (measured floor)" if measured else ""
    check_max(reasons, f"per-step logits max rel_l2{how}", numbers["step_logits_max_rel_l2"],
              limits["max_step_logits_rel_l2"])
    check_max(reasons, f"per-step logits worst mean KL{how}", numbers["step_logits_worst_mean_kl"],
              limits["max_step_kl_mean"])
    check_min(reasons, "stop cases exercised", metrics["stop_cases_exercised"], thresholds["min_stop_cases_exercised"])
    check_max(reasons, "stop cases not honoured", metrics["stop_failures"], thresholds["max_stop_failures"])
    missing_stops = set(REQUIRED_STOP_IDS) - set(stop_ids)
    if missing_stops:
        reasons.append(f"stop ids {sorted(missing_stops)} are not among the tokenizer's stop ids {list(stop_ids)}")
    if thresholds.get("require_session_reuse", True) and not metrics["session_reuse_ok"]:
        reasons.append("the session strategy re-used no cached tokens after turn 1")
    return metrics, reasons
