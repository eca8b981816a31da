"""The logic behind notebooks 01-04, checked against the reference (HF transformers), not against qwenlab itself."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import unicodedata

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch

from qwenlab.activations import planted
from qwenlab.activations.capture import capture_qwenlab, capture_to_file
from qwenlab.activations.diff import rel_l2_grid
from qwenlab.activations.dump import read_dump, write_dump
from qwenlab.activations.floors import Gates
from qwenlab.activations.reference import capture_reference, load_reference
from qwenlab.checks import decode_parity as dp
from qwenlab.checks import embedding_checks as ec
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks import plots
from qwenlab.checks import tokenizer_parity as tp
from qwenlab.checks.nbutil import load_thresholds
from qwenlab.model.kv_cache import KVCache
from qwenlab.model.loader import load
from qwenlab.model.tiny import ensure_tiny, write_checkpoint

GATES = Gates.from_thresholds(load_thresholds(None, "03_layer_diffs"))


@pytest.fixture(scope="module")
def tiny():
    return load(ensure_tiny(), "float32", "cpu")


@pytest.fixture(scope="module")
def reference(tiny):
    return load_reference(tiny.path, torch.float32, "cpu")


@pytest.fixture(scope="module")
def hf_tok(tiny):
    return tp.hf_tokenizer(tiny.path)


@pytest.fixture(scope="module")
def tik(tiny):
    return tp.TiktokenQwen(tiny.path)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("untied") / "tiny-untied", "tiny-untied")


# --- 01 tokenizer parity -------------------------------------------------------------------------------------------

def test_tiktoken_settings_come_from_tokenizer_json(tik):
    assert tik.forms == ["NFC"]
    assert r"\p{L}" in tik.pattern and tik.pattern.startswith("(?i:'s")
    assert tik.special_tokens["<|im_end|>"] == 151645 and tik.special_tokens["<|endoftext|>"] == 151643


def test_tiktoken_agrees_with_hf_on_the_corpus(tik, hf_tok):
    corpus = tp.load_corpus()
    for item in corpus:
        assert tik.encode(item["text"]) == hf_tok.encode(item["text"], add_special_tokens=False), item["id"]


def test_tiktoken_needs_nfc_on_decomposed_text(tik, hf_tok):
    text = "Cafe\u0301 na\u0308ive"  # decomposed: tokenizer.json composes it, raw tiktoken would not
    assert unicodedata.normalize("NFC", text) != text
    want = hf_tok.encode(text, add_special_tokens=False)
    assert tik.encode(text) == want
    assert tik.encoding.encode(text, allowed_special="all") != want


def test_corpus_parity_reports_a_planted_mismatch(tiny, hf_tok, tik):
    corpus = [{"id": "a", "category": "x", "text": "Hello, world!"}, {"id": "b", "category": "y", "text": "你好"}]
    encoders = tp.encoders(tiny.tokenizer, hf_tok, tik)
    clean = tp.corpus_parity(corpus, encoders)
    assert tp.mismatch_counts(clean) == {"qwenlab": 0, "tiktoken": 0}
    assert tp.mismatch_table(clean, corpus).empty
    encoders["qwenlab"] = lambda text: tiny.tokenizer.encode(text)[:-1]
    broken = tp.corpus_parity(corpus, encoders)
    assert tp.mismatch_counts(broken) == {"qwenlab": 2, "tiktoken": 0}
    table = tp.mismatch_table(broken, corpus)
    assert list(table["impl"]) == ["qwenlab", "qwenlab"]
    assert table.loc[0, "first_diff"] == len(hf_tok.encode("Hello, world!")) - 1
    assert tp.per_category(broken).loc["x", "qwenlab mismatches"] == 1


def test_chat_templates_match_hf(tiny, hf_tok):
    frame = tp.template_parity(tiny.tokenizer, hf_tok)
    assert len(frame) == len(tp.template_conversations()) * 6
    assert set(frame["enable_thinking"]) == {"None", "True", "False"}
    assert frame["match"].all(), frame[~frame["match"]]


def test_byte_fallback_is_one_id_per_byte(tiny):
    tok = tiny.tokenizer
    text = "<|im_start|>user\nHi 你好 👋<|im_end|>"
    ids = tp.byte_fallback_ids(text, tok, "vocab")
    assert len(ids) == len(text.encode("utf-8"))
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert all(len(tok.token_bytes(i)) == 1 for i in ids)
    assert tp.byte_fallback_ids(text, tok, "raw") == list(text.encode("utf-8"))
    assert len(ids) > len(tok.encode(text))


def test_fallback_comparison(tiny):
    text = tiny.tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    frame = tp.fallback_comparison(tiny.model, tiny.tokenizer, text)
    real = frame.loc["tokenizer.json"]
    assert real["token_ratio"] == 1.0 and real["next_token_kl"] == 0.0 and real["next_token_matches"]
    fb = frame.loc["byte fallback (vocab byte tokens)"]
    assert fb["tokens"] == len(text.encode("utf-8")) and fb["token_ratio"] > 2
    assert fb["next_token_kl"] > 0.1


# --- 02 embedding checks -------------------------------------------------------------------------------------------

def test_embedding_rows_equal_file_and_reference(tiny, reference):
    ids = tiny.tokenizer.encode("Hello 你好 <|im_end|>")
    table = ec.read_file_tensor(tiny.path, ec.EMBED)
    check = ec.rows_vs_file(ec.loaded_rows(tiny.model, ids), table, ids)
    assert check["bitwise_equal"] and check["max_abs"] == 0.0
    assert torch.equal(ec.reference_embed(reference, ids), ec.loaded_rows(tiny.model, ids))
    shifted = ec.rows_vs_file(ec.loaded_rows(tiny.model, [i + 1 for i in ids]), table, ids)
    assert not shifted["bitwise_equal"] and shifted["max_abs"] > 0


def test_tied_head_check(tiny, reference):
    head = ec.tied_head_check(tiny.model, tiny.path, reference)
    assert head["tie_word_embeddings"] and head["same_storage"] and head["reference_same_storage"] and head["ok"]
    assert not head["file_has_lm_head"]


def test_untied_head_check(untied):
    ckpt = load(untied, "float32", "cpu")
    head = ec.tied_head_check(ckpt.model, untied, load_reference(untied))
    assert not head["tie_word_embeddings"] and head["file_has_lm_head"] and not head["same_storage"]
    assert head["head_vs_file_max_abs"] == 0.0 and head["head_vs_reference_max_abs"] == 0.0 and head["ok"]
    with torch.no_grad():
        ckpt.model.lm_head.weight[3, 0] += 1.0
    assert not ec.tied_head_check(ckpt.model, untied)["ok"]
    assert ec.read_file_tensor(untied, ec.LM_HEAD).shape == (151936, 96)


def test_table_stats_and_handcrafted(tiny):
    table = ec.read_file_tensor(tiny.path, ec.EMBED)
    used = tiny.tokenizer.vocab_size
    stats = ec.table_stats(table, used)
    assert stats["rows"] == 151936 and stats["unused_rows"] == 151936 - used and stats["all_finite"]
    assert stats["norm_max"] == pytest.approx(table.norm(dim=-1).max().item(), rel=1e-6)
    ids = tiny.tokenizer.encode("The quick brown fox")
    frame = ec.handcrafted_comparison(tiny.model, table, ids, used)
    assert frame.loc["checkpoint", "prompt_rows_max_abs"] == 0 and frame.loc["checkpoint", "logits_kl_mean"] == 0
    for kind in ("random", "one_hot", "zeros"):
        assert frame.loc[kind, "prompt_rows_max_abs"] > 0.5 and frame.loc[kind, "logits_kl_mean"] > 0.1
    assert frame.loc["one_hot", "norm_std"] == 0
    assert torch.equal(tiny.model.model.embed_tokens.weight, table), "the model's table must be restored"


# --- 03 layer diffs and planted bugs -------------------------------------------------------------------------------

def test_encode_prompt(tiny):
    tok = tiny.tokenizer
    assert ld.encode_prompt(tok, "hi") == tok.encode("hi")
    assert ld.encode_prompt(tok, "chat: hi") == tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ld.encode_prompt(tok, [{"role": "user", "content": "hi"}]) == ld.encode_prompt(tok, "chat:hi")


def test_diff_prompts_pass_and_tables(tiny, reference):
    diffs = ld.diff_prompts(tiny.model, reference, tiny.tokenizer, ["Hello world", "chat:Hi"], GATES)
    summary = ld.summary_frame(diffs)
    assert summary["passed"].all() and summary["first_divergence"].isna().all()
    table = ld.worst_frame(diffs)
    assert list(table.index[:2]) == ["embed", "layers.0.input"] and table.index[-1] == "logits"
    assert ld.first_divergence(table) is None
    assert rel_l2_grid(table).shape == (4, 18)
    assert ld.pooled_logits(diffs)["positions"] == sum(len(d.ids) for d in diffs)


def test_candidate_dump_with_a_corrupted_layer(tiny, reference, tmp_path):
    ids = tiny.tokenizer.encode("The quick brown fox jumps")
    good = capture_to_file(tiny, ids, "qwenlab", tmp_path / "good.safetensors")
    diff = ld.diff_candidate(good, reference, GATES)
    assert diff.result.passed and diff.ids == ids
    assert bool(ld.candidate_identity(read_dump(good).metadata, tiny.config)["same config as the reference"])
    dump = read_dump(good)
    dump.tensors["layers.2.attn.v_proj"] = dump.tensors["layers.2.attn.v_proj"] * 1.01
    del dump.tensors["layers.3.mlp.act"]
    write_dump(tmp_path / "bad.safetensors", dump.tensors, dump.metadata)
    bad = ld.diff_candidate(tmp_path / "bad.safetensors", reference, GATES)
    assert bad.result.first_divergence == "layers.2.attn.v_proj"
    assert bad.result.only_in_reference == ["layers.3.mlp.act"]


def test_planted_bugs_are_localised(tiny, reference):
    ids = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    ref = capture_reference(reference, ids)
    bugs = planted.standard_bugs(tiny.model)
    assert [b.expected for b in bugs] == ["layers.0.attn.q_rope", "layers.1.attn.q_norm",
                                          "layers.1.input_layernorm", "layers.2.input_layernorm"]
    frame, results = planted.localise(bugs, ref, capture=lambda bug: bug.capture(tiny.model, ids))
    assert frame["localised"].all(), frame[["expected", "found"]]
    assert all(not r.passed for r in results.values())
    # the loaded model itself is untouched and still matches
    assert ld.diff_dumps(capture_qwenlab(tiny.model, ids), ref).passed


def test_swap_expectation_follows_the_weights(tiny_dir, tiny):
    swapped = planted.swap_layers(tiny.model, 1, 2)()
    assert torch.equal(swapped["model.layers.1.mlp.up_proj.weight"], tiny.model.model.layers[2].mlp.up_proj.weight)
    same_norms = load(tiny_dir, "float32", "cpu").model
    with torch.no_grad():
        same_norms.model.layers[2].input_layernorm.weight.copy_(same_norms.model.layers[1].input_layernorm.weight)
    assert planted.expected_swap_layers(same_norms, 1, 2) == "layers.1.attn.q_proj"


# --- 04 decode parity ----------------------------------------------------------------------------------------------

class ForgetfulCache(KVCache):
    """A broken cache: keeps only the newest positions, so decode steps attend to themselves alone."""

    def update(self, layer, k_new, v_new):
        super().update(layer, k_new, v_new)
        return k_new, v_new


def test_recorded_logits_are_the_ones_tokens_come_from(tiny):
    ids = tiny.tokenizer.encode("The quick brown fox")
    gen, logits = dp.generate_recorded(tiny.model, ids, dp.SamplingParams(max_new_tokens=6), "kv")
    assert logits.shape == (len(gen.ids), tiny.config.vocab_size)
    assert logits.argmax(-1).tolist() == gen.ids


def test_kv_equals_replay_and_reference(tiny, reference):
    prompts = {"raw": tiny.tokenizer.encode("The quick brown fox"),
               "chat": tiny.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku."}])}
    summary, steps = dp.greedy_parity(tiny.model, reference, prompts, 12, tiny.tokenizer.stop_ids)
    assert summary["kv_equals_replay"].all() and summary["kv_equals_reference"].all()
    assert summary["max_rel_l2_kv_vs_reference"].max() < 1e-5 and summary["max_kl_kv_vs_replay"].max() < 1e-6
    assert len(steps) == summary["kv_tokens"].sum()


def test_broken_cache_is_detected(tiny):
    ids = tiny.tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])
    params = dp.SamplingParams(max_new_tokens=12)
    broken = ForgetfulCache.for_config(tiny.config, max_len=64, dtype=torch.float32, device="cpu")
    result = dp.compare_modes(tiny.model, ids, params, cache=broken)
    assert not result["identical"] or result["max_rel_l2"] > 1e-3
    assert result["steps"]["rel_l2"].iloc[1:].max() > 1e-2  # the prefill step is fine, the decode steps are not


def test_chat_strategies_agree_and_a_broken_crop_is_caught(tiny, monkeypatch):
    # enable_thinking=False: the generation prompt carries an empty think block that the next turn's history
    # rendering drops, so the session must crop its cache back to the common prefix every turn
    turns = ["Hi!", "Tell me a story.", "Bye."]
    frame = dp.chat_parity(tiny.model, tiny.tokenizer, turns, 8, enable_thinking=False)
    assert frame["same_tokens_as_replay"].all()
    assert frame["max_rel_l2_vs_replay"].max() < 1e-5 and frame["max_kl_vs_replay"].max() < 1e-6
    session = frame[frame["strategy"] == "session"].reset_index(drop=True)
    assert (session["reused_tokens"].iloc[1:] > 0).all()
    assert (session["reused_tokens"] + session["prefill_tokens"] == session["prompt_tokens"]).all()
    cached_before = session["prompt_tokens"] + session["new_tokens"] - 1
    assert (session["reused_tokens"].iloc[1:].to_numpy() < cached_before.iloc[:-1].to_numpy()).all()
    monkeypatch.setattr(KVCache, "crop", lambda self, length: None)
    broken = dp.chat_parity(tiny.model, tiny.tokenizer, turns, 8, strategies=("replay", "session"),
                            enable_thinking=False)
    broken_session = broken[broken["strategy"] == "session"]
    assert not broken_session["same_tokens_as_replay"].all()
    assert broken_session["max_rel_l2_vs_replay"].iloc[1:].min() > 1e-2


def test_a_chat_turn_after_a_near_tie_parting_is_not_compared(tmp_path):
    """The 24-layer fixture in bfloat16: a cached strategy's answer parts from replay's at a near-tie before the last
    turn, so the turns after it carry another history. Which turn parts depends on the CPU's bfloat16 matmul kernels
    (oneDNN: the third with AMX, the second with AVX2 or AVX-512; ONEDNN_MAX_CPU_ISA picks one), hence four turns.
    A turn after the parting is not compared (its logits come from another context: they had given KL 3.2 at its
    first step and failed notebook 04); the parting turn is, and is explained by its margin."""
    from qwenlab.model.tiny import write_checkpoint

    ckpt = load(write_checkpoint(tmp_path / "deep", "tiny-deep"), "bfloat16", "cpu")
    turns = ["Hi! Who are you?", "Tell me a short story about a robot.", "Thanks. Summarise it in one line.",
             "Now make it rhyme."]
    frame = dp.chat_parity(ckpt.model, ckpt.tokenizer, turns, 24, enable_thinking=False)
    others = frame[frame["strategy"] != "replay"]
    parted = others[~others["same_tokens_as_replay"]].groupby("strategy")["turn"].min()
    assert len(parted) == 2 and (parted < len(turns)).all()
    for strategy, turn in parted.items():
        rows = frame[frame["strategy"] == strategy].set_index("turn")
        assert rows["same_context_as_replay"].loc[:turn].all()
        assert dp.explained(rows.loc[turn, "first_mismatch"], rows.loc[turn, "margin_at_mismatch"], 1.0)
        later = rows.loc[turn + 1:]
        assert not later["same_context_as_replay"].any() and later["max_kl_vs_replay"].isna().all()
    assert frame["max_kl_vs_replay"].max() < 0.5 and frame["first_mismatch"].notna().sum() == len(parted)


def test_stop_cases(tiny, reference, monkeypatch):
    tok = tiny.tokenizer
    prompts = {p: tok.encode(p) for p in ("Hello<|im_end|>", "The end.<|endoftext|>")}
    frame = dp.stop_cases(tiny.model, prompts, tok.stop_ids, 6, reference)
    assert frame["exercised"].all() and frame["honoured"].all() and frame["reference_agrees"].all()
    assert frame["stop_id"].tolist() == [151645, 151643]
    assert (frame["with_stops_reason"] == "stop_token").all() and frame["runs_on_without_stops"].all()
    chat = ("chat", tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}]))
    synthetic = dp.stop_cases(tiny.model, {}, tok.stop_ids, 8, reference, synthetic=chat, synthetic_step=3)
    assert len(synthetic) == 1 and synthetic["honoured"].all() and synthetic["reference_agrees"].all()
    row = synthetic.iloc[0]
    assert row["exercised"] and row["with_stops_reason"] == "stop_token" and row["stop_id"] not in tok.stop_ids
    assert row["with_stops_ids"][-1] == row["stop_id"] and len(row["with_stops_ids"]) <= 4
    real_generate = dp.generate
    monkeypatch.setattr(dp, "generate", lambda *a, **k: real_generate(*a, **{**k, "stop_ids": ()}))
    ignored = dp.stop_cases(tiny.model, prompts, tok.stop_ids, 6)
    assert ignored["exercised"].all() and not ignored["honoured"].any()


def test_latency_profile_and_plot(tiny):
    steps = dp.latency_profile(tiny.model, dp.filler_ids(tiny.tokenizer, 40), 6)
    assert len(dp.filler_ids(tiny.tokenizer, 40)) == 40
    assert sorted(steps["mode"].unique()) == ["kv", "replay"] and len(steps) == 2 * 5
    assert steps.groupby("mode")["position"].min().tolist() == [40, 40]
    summary = dp.latency_summary(steps)
    assert (summary["tokens"] == 6).all()
    by_position = dp.latency_by_position(tiny.model, tiny.tokenizer, [16, 64, 10**6], steps=2)
    assert sorted(by_position["position"].unique()) == [16, 64]  # beyond the context: dropped
    assert set(dp.growth(by_position)) == {"kv", "replay"}
    left, right, work = plots.latency_plot(steps, by_position).axes
    assert [line.get_label() for line in left.lines] == ["kv: ms per token", "replay: ms per token"]
    for line, (_, group) in zip(left.lines, steps.groupby("mode")):
        assert list(line.get_xdata()) == list(group["position"]) and list(line.get_ydata()) == list(group["step_ms"])
    replay_positions = steps[steps["mode"] == "replay"]["position"]
    assert list(work.lines[1].get_ydata()) == list(replay_positions + 1)  # replay runs the whole sequence
    assert right.get_xlabel() == "context length (tokens)"
    assert [list(line.get_xdata()) for line in right.lines] == [[16, 64], [16, 64]]
    turns = dp.chat_parity(tiny.model, tiny.tokenizer, ["Hi"], 2)[["strategy", "turn", "turn_s"]]
    bars = plots.turn_plot(turns).axes[0]
    strategies = list(dict.fromkeys(turns["strategy"]))
    assert [t.get_text() for t in bars.get_legend().get_texts()] == strategies
    heights = [1000 * s for strategy in strategies for s in turns[turns["strategy"] == strategy]["turn_s"]]
    assert [p.get_height() for p in bars.patches] == pytest.approx(heights)


def test_figures_render(tiny):
    table = ec.read_file_tensor(tiny.path, ec.EMBED)
    norms = ec.row_norms(table)
    hist = plots.row_norm_histogram(norms, 151669, rug=norms[:5].tolist(), labelled={"x": 4.0}).axes[0]
    assert sum(p.get_height() for p in hist.patches) == len(norms)  # every row in one bin of one of the two histograms
    assert [t.get_text() for t in hist.get_legend().get_texts()] == [
        "ids < 151669 (tokenizer)", "ids >= 151669 (never produced)", "prompt tokens"]
    rug, labelled = hist.lines
    assert list(rug.get_xdata()) == pytest.approx(norms[:5].tolist()) and list(labelled.get_xdata()) == [4.0, 4.0]
    assert [t.get_text() for t in hist.texts] == [" x"] and hist.get_xlabel() == "row L2 norm"
    bars = plots.barh({"a": 1.0, "b": 2.0}, "t", "x").axes[0]
    assert [p.get_width() for p in bars.patches] == [1.0, 2.0]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["a", "b"]
    assert bars.get_title() == "t" and bars.get_xlabel() == "x"


def test_parity_numbers_tell_near_ties_from_bugs():
    import pandas as pd

    greedy = pd.DataFrame({
        "kv_equals_replay": [True, False], "kv_equals_reference": [True, False],
        "first_mismatch_replay": [None, 3], "margin_at_mismatch_replay": [None, 0.5],
        "first_mismatch_reference": [None, 5], "margin_at_mismatch_reference": [None, 4.0],
        "max_rel_l2_kv_vs_replay": [1e-7, 1e-2], "max_rel_l2_kv_vs_reference": [1e-7, 2e-2],
        "max_kl_kv_vs_replay": [0.0, 0.1], "max_kl_kv_vs_reference": [0.0, 0.2],
        "mean_kl_kv_vs_replay": [0.0, 0.01], "mean_kl_kv_vs_reference": [0.0, 0.02]})
    chat = pd.DataFrame({
        "strategy": ["replay", "session"], "same_tokens_as_replay": [True, False],
        "first_mismatch": [float("nan"), 2.0], "margin_at_mismatch": [float("nan"), 0.25],
        "max_rel_l2_vs_replay": [0.0, 3e-2], "max_kl_vs_replay": [0.0, 0.3], "mean_kl_vs_replay": [0.0, 0.03]})
    strict = dp.parity_numbers(greedy, chat, flip_margin=0.0)
    assert strict["token_mismatches"] == 1 and strict["unexplained_token_mismatches"] == 2
    assert strict["chat_mismatches"] == 1 and strict["unexplained_chat_mismatches"] == 1
    assert strict["step_logits_max_rel_l2"] == 3e-2 and strict["step_logits_worst_mean_kl"] == 0.03
    loose = dp.parity_numbers(greedy, chat, flip_margin=1.0)
    assert loose["unexplained_token_mismatches"] == 1  # the flip at margin 4.0 is still a bug
    assert loose["unexplained_chat_mismatches"] == 0


def test_a_notebook_of_another_checkout_refuses_this_kernel(tmp_path):
    """JupyterLab runs a notebook in its folder; a kernel importing another checkout's qwenlab stops with one line."""
    from qwenlab.checks.nbutil import check_checkout
    from qwenlab.errors import QwenlabError
    from qwenlab.paths import REPO_ROOT

    check_checkout(REPO_ROOT / "notebooks")  # this checkout: fine
    check_checkout(tmp_path)  # a folder that is no checkout: nothing to check
    other = tmp_path / "other"
    (other / "qwenlab").mkdir(parents=True)
    (other / "qwenlab" / "__init__.py").write_text("")
    (other / "notebooks").mkdir()
    with pytest.raises(QwenlabError, match=r"this kernel runs .*not this checkout's .*other/qwenlab.*kernelspec"):
        check_checkout(other / "notebooks")


def test_bf16_decode_is_judged_against_the_reference_noise_and_a_bug_still_fails():
    """Notebook 04 in bfloat16: the per-step limits are 4x / 8x transformers' own bf16-vs-float32 noise on the same
    prompts (doc/floors.md); a correct decode passes under them, one down_proj scaled by 1.2 does not."""
    import copy

    from qwenlab.activations.nvfp4_reference import load_reference_for

    ckpt = load(ensure_tiny(), "bfloat16", "cpu")
    reference = load_reference_for(ckpt)
    tok = ckpt.tokenizer
    prompts = {"raw": tok.encode("The quick brown fox"),
               "chat": tok.encode_chat([{"role": "user", "content": "Write a haiku about the sea."}])}
    thresholds = load_thresholds(None, "04_decode_kv_parity")

    def numbers(model):
        greedy, _ = dp.greedy_parity(model, reference, prompts, 12, tok.stop_ids)
        chat = dp.chat_parity(model, tok, ["Hi!", "Bye."], 4, strategies=("replay", "session"), enable_thinking=False)
        return greedy, chat

    greedy, chat = numbers(ckpt.model)
    noise, note = dp.measure_step_noise(ckpt, prompts, greedy, dp.reference_steps(reference, prompts, greedy))
    assert note.startswith("floors measured: transformers in bfloat16 against itself in float32")
    assert noise["steps"].tolist() == greedy["reference_tokens"].tolist()
    assert 1e-3 < noise["max_rel_l2"].max() < 0.05  # bf16 rounding: neither zero nor a different model
    limits, measured = dp.step_limits(thresholds, "bfloat16", noise)
    assert measured and limits["max_step_logits_rel_l2"] == pytest.approx(4 * noise["max_rel_l2"].max() + 0.002)
    shift = noise["max_margin_shift"].max()
    assert 0 < shift < 2.0  # bf16 rounding moves the top-2 gap of these logits, by less than a unit
    assert limits["flip_margin"] == pytest.approx(max(1.0, 2 * shift))

    def verdict(greedy, chat):
        stops = pd.DataFrame({"exercised": [True], "honoured": [True], "reference_agrees": [True], "stop_id": [151645]})
        latency = pd.DataFrame({"mode": ["kv", "replay"], "step": [0, 0], "position": [8, 8], "step_ms": [1.0, 2.0],
                                "prefill_ms": [1.0, 1.0]})
        by_position = pd.DataFrame({"mode": ["kv", "replay"], "position": [8, 8], "ms_per_token": [1.0, 2.0]})
        return dp.verdict(thresholds, dtype="bfloat16", greedy=greedy, chat=chat, chat_turns=["Hi!", "Bye."],
                          latency=latency, by_position=by_position, stops=stops, stop_ids=tok.stop_ids, noise=noise)

    metrics, reasons = verdict(greedy, chat)
    assert reasons == [] and metrics["step_limits"]["measured"]
    bad = copy.deepcopy(ckpt.model)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight.mul_(1.2)
    _, reasons = verdict(*numbers(bad))
    assert "per-step logits max rel_l2 (measured floor)" in " ".join(reasons)
    assert "per-step logits worst mean KL (measured floor)" in " ".join(reasons)


def test_a_float32_reference_that_does_not_fit_keeps_the_fixed_limits(monkeypatch):
    """measure_step_noise checks the float32 reference's bytes against the free memory before loading it."""
    from qwenlab.memory.plan import DeviceMemory

    ckpt = load(ensure_tiny(), "bfloat16", "cpu")
    ids = ckpt.tokenizer.encode("The quick brown fox")
    greedy = pd.DataFrame({"reference_ids": [[1, 2, 3]]}, index=["p"])
    monkeypatch.setattr(dp, "visible_devices", lambda device: [DeviceMemory("cpu", 1 << 20, 1 << 30)])
    noise, note = dp.measure_step_noise(ckpt, {"p": ids}, greedy, {})
    assert noise is None
    assert note.startswith("floors not measured: the float32 reference needs ") and "the fixed limits apply" in note


def test_a_float32_reference_that_fits_only_alone_is_measured_once_the_model_is_released(monkeypatch):
    """Notebook 04 on a model whose float32 reference fits one GPU only without it (Qwen3-30B-A3B or -32B on one
    H200): with release_model, qwenlab's weights go to the meta device first, then the floors are measured, the same
    numbers as with room to spare. Without it, or for an NVFP4 model (its quantized reference is exported from it),
    the fixed limits apply and the model is left alone."""
    from qwenlab.activations.nvfp4_reference import load_reference_for
    from qwenlab.memory.plan import DeviceMemory

    ckpt = load(ensure_tiny(), "bfloat16", "cpu")
    reference = load_reference_for(ckpt)
    tok = ckpt.tokenizer
    prompts = {"raw": tok.encode("The quick brown fox")}
    greedy, _ = dp.greedy_parity(ckpt.model, reference, prompts, 8, tok.stop_ids)
    ref_steps = dp.reference_steps(reference, prompts, greedy)
    roomy, _ = dp.measure_step_noise(ckpt, prompts, greedy, ref_steps)

    def free_once_released(device):  # room for the float32 reference only once qwenlab's weights are gone
        released = all(p.device.type == "meta" for p in ckpt.model.parameters())
        return [DeviceMemory("cpu", (1 << 34) if released else (1 << 20), 1 << 35)]

    monkeypatch.setattr(dp, "visible_devices", free_once_released)
    noise, note = dp.measure_step_noise(ckpt, prompts, greedy, ref_steps)
    assert noise is None and "the fixed limits apply" in note
    assert all(p.device.type == "cpu" for p in ckpt.model.parameters())
    noise, note = dp.measure_step_noise(ckpt, prompts, greedy, ref_steps, release_model=True)
    assert note.startswith("floors measured") and note.endswith("qwenlab's model was released first to make room")
    assert all(p.device.type == "meta" for p in ckpt.model.parameters())
    pd.testing.assert_frame_equal(noise, roomy)

    quantized = load(ensure_tiny(), "bfloat16", "cpu", quant="nvfp4")
    monkeypatch.setattr(dp, "visible_devices", lambda device: [DeviceMemory("cpu", 1 << 20, 1 << 35)])
    noise, note = dp.measure_step_noise(quantized, prompts, greedy, ref_steps, release_model=True)
    assert noise is None and "the fixed limits apply" in note
    assert not any(p.device.type == "meta" for p in quantized.model.parameters())
