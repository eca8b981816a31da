"""The verdict of notebooks 01-04, from small hand-made inputs shaped like what each notebook passes."""
import pandas as pd
import pytest
import torch

from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.floors import Gates
from qwenlab.checks import decode_parity as dp
from qwenlab.checks import embedding_checks as ec
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks import tokenizer_parity as tp
from qwenlab.checks.nbutil import load_thresholds

# --- 01 tokenizer parity -------------------------------------------------------------------------------------------

CORPUS = [{"id": "a", "category": "ascii", "text": "Hello, world!"},
          {"id": "b", "category": "cjk", "text": "你好"}]
FALLBACK_ROWS = ["tokenizer.json", "byte fallback (vocab byte tokens)", "byte fallback (raw byte values)"]
FALLBACK = pd.DataFrame({"tokens": [4, 19, 19], "token_ratio": [1.0, 4.75, 4.75],
                         "same_id_same_position_pct": [100.0, 10.0, 0.0], "next_token_matches": [True, False, False],
                         "next_token_kl": [0.0, 1.5, 2.5]}, index=FALLBACK_ROWS)
INFLATION = pd.DataFrame({"bytes": [13, 6], "tokens": [4, 2], "fallback_ratio": [3.25, 3.0]}, index=["ascii", "cjk"])


def utf8_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def tokenizer_verdict(qwenlab_encode=utf8_ids, template_matches=(True, True)):
    parity = tp.corpus_parity(CORPUS, {"transformers": utf8_ids, "qwenlab": qwenlab_encode, "tiktoken": utf8_ids})
    templates = pd.DataFrame({"conversation": ["single_turn"] * 2, "match": list(template_matches)})
    thresholds = {**load_thresholds(None, "01_tokenizer_parity"), "min_corpus_size": len(CORPUS)}
    return tp.verdict(thresholds, corpus=CORPUS, mismatches=tp.mismatch_counts(parity),
                      categories=tp.per_category(parity), templates=templates, fallback=FALLBACK, inflation=INFLATION)


def test_tokenizer_verdict_passes_when_every_encoding_agrees():
    metrics, reasons = tokenizer_verdict()
    assert reasons == []
    assert metrics["corpus_size"] == 2 and metrics["corpus_tokens"] == 13 + 6
    assert metrics["mismatches_qwenlab"] == 0 and metrics["template_cases"] == 2
    assert metrics["per_category"]["cjk"]["ref_tokens"] == 6
    assert metrics["fallback_prompt_tokens"] == 4 and metrics["fallback_tokens"] == 19
    assert metrics["raw_fallback_next_token_kl"] == 2.5
    assert metrics["corpus_fallback_ratio"] == pytest.approx(19 / 6)


def test_tokenizer_verdict_regresses_on_encode_and_template_mismatches():
    metrics, reasons = tokenizer_verdict(qwenlab_encode=lambda text: utf8_ids(text)[:-1],
                                         template_matches=(True, False))
    assert metrics["mismatches_qwenlab"] == 2 and metrics["mismatches_tiktoken"] == 0
    assert metrics["template_mismatches"] == 1
    assert reasons == ["qwenlab encode mismatches = 2 exceeds 0", "chat template mismatches = 1 exceeds 0"]


def test_tokenizer_verdict_regresses_on_a_small_corpus():
    thresholds = load_thresholds(None, "01_tokenizer_parity")
    _, reasons = tp.verdict(thresholds, corpus=CORPUS, mismatches={}, categories=pd.DataFrame({"ref_tokens": [3]}),
                            templates=pd.DataFrame({"match": [True]}), fallback=FALLBACK, inflation=INFLATION)
    assert reasons == [f"corpus size = 2 is below {thresholds['min_corpus_size']}"]


# --- 02 embedding checks -------------------------------------------------------------------------------------------

HANDCRAFTED = pd.DataFrame({"prompt_rows_max_abs": [0.0, 0.9], "logits_kl_mean": [0.0, 1.2]},
                           index=["checkpoint", "zeros"])


def embedding_verdict(max_abs_vs_file=0.0, rel_l2_vs_reference=0.0, head_ok=True, all_finite=True):
    vs_file = {"file_dtype": "float32", "bitwise_equal": max_abs_vs_file == 0.0, "max_abs": max_abs_vs_file,
               "rel_l2": max_abs_vs_file}
    vs_reference = {"max_abs": rel_l2_vs_reference, "rel_l2": rel_l2_vs_reference}
    head = {"tie_word_embeddings": True, "same_storage": head_ok, "ok": head_ok}
    stats = {"rows": 8, "unused_rows": 2, "all_finite": all_finite}
    return ec.verdict(load_thresholds(None, "02_embedding_checks"), ids=[1, 2, 3], vs_file=vs_file,
                      vs_reference=vs_reference, reference_floor=1e-6, head=head, stats=stats,
                      handcrafted=HANDCRAFTED)


def test_embedding_verdict_passes_on_bitwise_equal_rows():
    metrics, reasons = embedding_verdict()
    assert reasons == []
    assert metrics["prompt_tokens"] == 3 and metrics["bitwise_equal_file"] and metrics["reference_floor"] == 1e-6
    assert metrics["tied"] and metrics["head_ok"] and metrics["table"]["rows"] == 8
    assert metrics["handcrafted"]["zeros"]["logits_kl_mean"] == 1.2


def test_embedding_verdict_regresses_on_rows_head_and_table():
    metrics, reasons = embedding_verdict(max_abs_vs_file=0.5, rel_l2_vs_reference=0.25, head_ok=False,
                                         all_finite=False)
    assert not metrics["bitwise_equal_file"] and metrics["max_abs_vs_file"] == 0.5
    assert reasons[:2] == ["prompt rows max |loaded - file| = 0.5 exceeds 0",
                           "prompt rows rel_l2 vs reference embed = 0.25 exceeds 1e-06"]
    assert reasons[2].startswith("lm_head check failed (tied): ")
    assert reasons[3] == "embedding table has non-finite values"


# --- 03 layer diffs ------------------------------------------------------------------------------------------------

def layer_dump(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    names = ["embed", "layers.0.input", "layers.0.output", "norm"]
    tensors = {name: torch.randn(1, 3, 4, generator=gen) for name in names}
    return {**tensors, "logits": torch.randn(1, 3, 10, generator=gen)}


def prompt_diff(corrupt: str | None = None) -> ld.PromptDiff:
    reference = layer_dump()
    candidate = {name: t * 1.1 if name == corrupt else t.clone() for name, t in reference.items()}
    return ld.PromptDiff("p", [1, 2, 3], reference, diff_dumps(candidate, reference, dtype="float32"))


def layer_verdict(diffs, localised=(True, True), **kwargs):
    planted = pd.DataFrame({"expected": ["layers.0.attn.q_rope", "layers.1.attn.q_norm"][: len(localised)],
                            "localised": list(localised)})
    thresholds = load_thresholds(None, "03_layer_diffs")
    return ld.verdict(thresholds, dtype="float32", diffs=diffs, summary=ld.summary_frame(diffs),
                      table=ld.worst_frame(diffs), logits=ld.pooled_logits(diffs), localised=planted,
                      gates=Gates.from_thresholds(thresholds), **kwargs)


def test_layer_verdict_passes_when_every_tensor_matches():
    metrics, reasons = layer_verdict([prompt_diff(), prompt_diff()])
    assert reasons == []
    assert metrics["prompts"] == 2 and metrics["prompt_tokens"] == [3, 3] and metrics["compared_tensors"] == 10
    assert metrics["divergent_prompts"] == 0 and metrics["first_divergence"] is None and metrics["max_rel_l2"] == 0.0
    assert metrics["logits"]["kl_mean"] == 0.0 and metrics["planted_localised"] == metrics["planted_total"] == 2


def test_layer_verdict_regresses_on_a_divergent_tensor_and_a_missed_bug():
    metrics, reasons = layer_verdict([prompt_diff(), prompt_diff(corrupt="layers.0.output")], localised=(True, False))
    assert metrics["divergent_prompts"] == 1 and metrics["first_divergence"] == "layers.0.output"
    assert metrics["max_rel_l2"] == pytest.approx(0.1)
    assert reasons == ["prompts with a divergent tensor = 1 exceeds 0",
                       "first divergent tensor: layers.0.output (rel_l2 0.1, 1e+04x its floor 1e-05)",
                       "planted bugs localised (fraction) = 0.5 is below 1"]


def test_layer_verdict_names_a_candidate_dumped_for_another_config():
    _, reasons = layer_verdict([prompt_diff()], localised=(), plant_bugs=False, candidate="cand.safetensors",
                               candidate_meta={"config_hash": "abc"}, config_hash="def")
    assert reasons == ["candidate was dumped for config abc, not this checkpoint's def"]


# --- 04 decode parity ----------------------------------------------------------------------------------------------

GREEDY = pd.DataFrame({
    "kv_tokens": [5, 7], "min_ref_top2_margin": [0.5, 2.0],
    "kv_equals_replay": [True, True], "kv_equals_reference": [True, True],
    "first_mismatch_replay": [None, None], "margin_at_mismatch_replay": [None, None],
    "first_mismatch_reference": [None, None], "margin_at_mismatch_reference": [None, None],
    "max_rel_l2_kv_vs_replay": [1e-7, 2e-7], "max_rel_l2_kv_vs_reference": [1e-7, 3e-7],
    "max_kl_kv_vs_replay": [0.0, 0.0], "max_kl_kv_vs_reference": [0.0, 1e-9],
    "mean_kl_kv_vs_replay": [0.0, 0.0], "mean_kl_kv_vs_reference": [0.0, 1e-10]})
LATENCY = pd.DataFrame({"mode": ["kv"] * 3 + ["replay"] * 3, "step": [0, 1, 2] * 2, "position": [8, 9, 10] * 2,
                        "step_ms": [2.0, 2.0, 3.0, 4.0, 6.0, 8.0], "prefill_ms": [10.0] * 3 + [10.0] * 3})
BY_POSITION = pd.DataFrame({"mode": ["kv", "replay"] * 2, "position": [16, 16, 64, 64],
                            "ms_per_token": [2.0, 4.0, 2.5, 16.0]})
STOP_IDS = (151645, 151643)


def chat_frame(session_reused=(0, 30, 60), session_same=(True, True, True)) -> pd.DataFrame:
    replay = {"strategy": ["replay"] * 3, "turn": [1, 2, 3], "same_tokens_as_replay": [True] * 3,
              "first_mismatch": [float("nan")] * 3, "margin_at_mismatch": [float("nan")] * 3,
              "max_rel_l2_vs_replay": [0.0] * 3, "max_kl_vs_replay": [0.0] * 3, "mean_kl_vs_replay": [0.0] * 3,
              "reused_tokens": [0] * 3, "prefill_tokens": [20, 50, 80], "turn_s": [0.5, 1.0, 1.5]}
    session = {**replay, "strategy": ["session"] * 3, "same_tokens_as_replay": list(session_same),
               "first_mismatch": [float("nan") if same else 1.0 for same in session_same],
               "margin_at_mismatch": [float("nan") if same else 3.0 for same in session_same],
               "reused_tokens": list(session_reused), "prefill_tokens": [20, 20, 20], "turn_s": [0.25] * 3}
    return pd.concat([pd.DataFrame(replay), pd.DataFrame(session)], ignore_index=True)


def stops_frame(honoured=(True, True)) -> pd.DataFrame:
    return pd.DataFrame({"exercised": [True, True], "honoured": list(honoured), "reference_agrees": [True, True],
                         "stop_id": [151645, 151643]})


def decode_verdict(chat=None, stops=None, stop_ids=STOP_IDS):
    return dp.verdict(load_thresholds(None, "04_decode_kv_parity"), dtype="float32", greedy=GREEDY,
                      chat=chat_frame() if chat is None else chat, chat_turns=["Hi", "Story", "Bye"],
                      latency=LATENCY, by_position=BY_POSITION, stops=stops_frame() if stops is None else stops,
                      stop_ids=stop_ids)


def test_decode_verdict_passes_when_kv_replay_and_reference_agree():
    metrics, reasons = decode_verdict()
    assert reasons == []
    assert metrics["dtype"] == "float32" and metrics["prompts"] == 2 and metrics["new_tokens"] == [5, 7]
    assert metrics["unexplained_token_mismatches"] == 0 and metrics["step_logits_max_rel_l2"] == 3e-7
    assert metrics["chat_turns"] == 3 and metrics["session_reuse_ok"]
    assert metrics["session_reused_tokens"] == [0, 30, 60] and metrics["session_prefill_tokens"] == [20, 20, 20]
    assert metrics["chat_total_s"] == {"replay": 3.0, "session": 0.75}
    assert metrics["kv_ms_per_token"] == 2.0 and metrics["replay_ms_per_token"] == 6.0
    assert metrics["replay_over_kv"] == 3.0
    assert metrics["growth_longest_over_shortest"] == {"kv": 1.25, "replay": 4.0}
    assert metrics["stop_cases_exercised"] == 2 and metrics["stop_failures"] == 0
    assert metrics["stop_ids_seen"] == [151643, 151645] and metrics["stop_ids_configured"] == [151645, 151643]


def test_decode_verdict_regresses_on_a_stale_session_cache():
    metrics, reasons = decode_verdict(chat=chat_frame(session_reused=(0, 0, 60), session_same=(True, False, True)))
    assert not metrics["session_reuse_ok"] and metrics["unexplained_chat_mismatches"] == 1
    assert reasons == ["chat turns whose tokens differ from replay (not at a near-tie) = 1 exceeds 0",
                       "the session strategy re-used no cached tokens after turn 1"]


def test_decode_verdict_regresses_on_stop_tokens():
    metrics, reasons = decode_verdict(stops=stops_frame(honoured=(True, False)), stop_ids=(151645,))
    assert metrics["stop_failures"] == 1
    assert reasons == ["stop cases not honoured = 1 exceeds 0",
                       "stop ids [151643] are not among the tokenizer's stop ids [151645]"]


def noise_frame(max_rel_l2: float, mean_kl: float) -> pd.DataFrame:
    return pd.DataFrame({"steps": [5, 7], "max_rel_l2": [max_rel_l2 / 2, max_rel_l2], "mean_kl": [mean_kl, mean_kl / 3],
                         "max_kl": [mean_kl * 4] * 2, "top1_disagreements": [0, 0]}, index=["a", "b"])


def bf16_verdict(step_rel_l2: float, step_kl: float, noise=None):
    greedy = GREEDY.assign(max_rel_l2_kv_vs_reference=[step_rel_l2 / 2, step_rel_l2],
                           mean_kl_kv_vs_reference=[step_kl, step_kl / 2])
    return dp.verdict(load_thresholds(None, "04_decode_kv_parity"), dtype="bfloat16", greedy=greedy,
                      chat=chat_frame(), chat_turns=["Hi", "Story", "Bye"], latency=LATENCY, by_position=BY_POSITION,
                      stops=stops_frame(), stop_ids=STOP_IDS, noise=noise)


def test_decode_step_limits_are_measured_from_the_reference_noise_in_low_precision():
    # the 32B-shape case: a correct bf16 decode whose logits KL (0.069) is over the fixed 0.02, as transformers' is
    metrics, reasons = bf16_verdict(0.12, 0.069)
    assert reasons == ["per-step logits max rel_l2 = 0.12 exceeds 0.1",
                       "per-step logits worst mean KL = 0.069 exceeds 0.02"]
    assert metrics["step_limits"]["measured"] is False and metrics["step_noise"] is None
    metrics, reasons = bf16_verdict(0.12, 0.069, noise=noise_frame(max_rel_l2=0.06, mean_kl=0.03))
    assert reasons == []
    assert metrics["step_limits"] == {"measured": True, "max_step_logits_rel_l2": 4 * 0.06 + 0.002,
                                      "max_step_kl_mean": 8 * 0.03 + 1e-5, "flip_margin": 1.0}
    assert metrics["step_noise"]["b"]["max_rel_l2"] == 0.06
    # a candidate far outside the reference's own noise still fails, below the fixed limits too
    metrics, reasons = bf16_verdict(0.05, 0.01, noise=noise_frame(max_rel_l2=0.005, mean_kl=0.0002))
    assert reasons == ["per-step logits max rel_l2 (measured floor) = 0.05 exceeds 0.022",
                       "per-step logits worst mean KL (measured floor) = 0.01 exceeds 0.00161"]


def test_the_flip_margin_grows_with_the_measured_margin_noise():
    """The Qwen3-32B shape on an H200: logits in the hundreds, so one bfloat16 rounding step of a logit is 2; kv,
    replay and transformers parted at top-2 margins of 0 and 2, under the fixed flip margin 1.0 three bugs. The
    reference's own bf16-vs-float32 logits move the top-2 margin by up to a few units there: with that measured,
    such a parting is a precision flip, one at a clear margin (40) is still a bug, and on small logits (shift 0.1)
    the fixed margin stays."""
    parted = GREEDY.assign(kv_equals_reference=[True, False], first_mismatch_reference=[None, 3],
                           margin_at_mismatch_reference=[None, 2.0])
    thresholds = load_thresholds(None, "04_decode_kv_parity")

    def judged(greedy, shift):
        noise = None if shift is None else noise_frame(0.02, 0.07).assign(max_margin_shift=[shift / 3, shift])
        return dp.verdict(thresholds, dtype="bfloat16", greedy=greedy, chat=chat_frame(),
                          chat_turns=["Hi", "Story", "Bye"], latency=LATENCY, by_position=BY_POSITION,
                          stops=stops_frame(), stop_ids=STOP_IDS, noise=noise)

    metrics, reasons = judged(parted, None)
    assert reasons == ["prompts where kv / replay / reference tokens differ (not at a near-tie) = 1 exceeds 0"]
    metrics, reasons = judged(parted, 3.0)
    assert reasons == [] and metrics["step_limits"]["flip_margin"] == 6.0
    metrics, reasons = judged(parted.assign(margin_at_mismatch_reference=[None, 40.0]), 3.0)
    assert reasons == ["prompts where kv / replay / reference tokens differ (not at a near-tie) = 1 exceeds 0"]
    metrics, reasons = judged(parted, 0.1)
    assert metrics["step_limits"]["flip_margin"] == 1.0 and len(reasons) == 1


def test_step_metrics_measure_how_far_the_top2_margin_moves():
    ref = torch.tensor([[10.0, 7.0, 0.0], [1.0, 5.0, 4.5]])
    cand = torch.tensor([[9.0, 7.5, 1.0], [1.0, 4.0, 4.6]])  # step 2 flips: the gap 0.5 became -0.6
    steps = dp.step_metrics(cand, ref)
    assert steps["ref_top2_margin"].tolist() == pytest.approx([3.0, 0.5])
    assert steps["margin_shift"].tolist() == pytest.approx([1.5, 1.1])
    assert steps["top1_match"].tolist() == [True, False]


def test_a_float32_decode_keeps_the_fixed_limits():
    limits, measured = dp.step_limits(load_thresholds(None, "04_decode_kv_parity"), "float32",
                                      noise_frame(max_rel_l2=0.06, mean_kl=0.03))
    assert not measured and limits["max_step_logits_rel_l2"] == 1e-5 and limits["max_step_kl_mean"] == 1e-6
