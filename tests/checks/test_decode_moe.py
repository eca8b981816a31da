"""Notebook 04 on a MoE model: a token produced where a router sat at a near-tie can take another expert by rounding
alone, and that moves its logits far more than rounding does. Such tokens are found (routing_near_ties), listed and
left out of the per-step numbers the verdict judges; a routing bug still fails. Checked on the tiny MoE in
bfloat16 against transformers, with the floors measured from transformers' own bf16 noise."""
import pytest
import torch

from qwenlab.activations import planted_moe
from qwenlab.activations.nvfp4_reference import load_reference_for
from qwenlab.checks import decode_parity as dp
from qwenlab.checks.nbutil import load_thresholds
from qwenlab.model.hooks import hooks
from qwenlab.model.loader import load

PROMPTS = ("The quick brown fox", "Name three prime numbers and explain why they are prime.")


@pytest.fixture(scope="module")
def bf16(moe_dir):
    ckpt = load(moe_dir, "bfloat16", "cpu")
    reference = load_reference_for(ckpt)
    prompts = {p: ckpt.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS}
    greedy, steps = dp.greedy_parity(ckpt.model, reference, prompts, 32, ckpt.tokenizer.stop_ids)
    noise, _ = dp.measure_step_noise(ckpt, prompts, greedy, dp.reference_steps(reference, prompts, greedy))
    limits, measured = dp.step_limits(load_thresholds(None, "04_decode_kv_parity"), "bfloat16", noise)
    assert measured
    return ckpt, reference, prompts, greedy, steps, limits


def test_near_tie_tokens_explain_the_spikes_and_the_rest_pass(bf16):
    ckpt, _, _, greedy, steps, limits = bf16
    spikes = steps[(steps["kv_vs_replay_rel_l2"] > limits["max_step_logits_rel_l2"])
                   | (steps["kv_vs_reference_rel_l2"] > limits["max_step_logits_rel_l2"])]
    assert len(spikes) >= 1  # this fixture flips an expert in bf16: the case the verdict must not call a bug
    assert spikes["routing_near_tie_layer"].notna().all()  # every spike is a token chosen at a router near-tie
    assert greedy["max_rel_l2_kv_vs_reference_all"].max() > limits["max_step_logits_rel_l2"]
    judged = max(greedy["max_rel_l2_kv_vs_reference"].max(), greedy["max_rel_l2_kv_vs_replay"].max())
    assert judged <= limits["max_step_logits_rel_l2"]
    assert greedy["mean_kl_kv_vs_reference"].max() <= limits["max_step_kl_mean"]
    ties = steps["routing_near_tie_layer"].notna().sum()
    assert 0 < ties < len(steps) / 2 and greedy["routing_near_tie_steps"].sum() == ties
    # the steps judged are counted, so a run whose every step sat at a near-tie (the 30B-A3B shape) can say so
    assert (greedy["judged_steps"] < greedy["compared_steps"]).any() and (greedy["judged_steps"] > 0).all()
    numbers = dp.parity_numbers(greedy, dp.chat_parity(ckpt.model, ckpt.tokenizer, ["Hi!"], 4), 1.0)
    assert 0 < numbers["judged_steps"] < numbers["compared_steps"]
    # and the reference's own sequence, teacher-forced with the near-tie flips forced: every step judged, inside
    # the same limits, spikes included
    assert (greedy["forced_steps"] == greedy["reference_tokens"]).all() and numbers["forced_steps"] > 0
    assert greedy["forced_max_rel_l2_vs_reference"].max() <= limits["max_step_logits_rel_l2"]
    assert greedy["forced_mean_kl_vs_reference"].max() <= limits["max_step_kl_mean"]
    assert greedy["routing_near_tie_max_rel_l2"].max() == pytest.approx(spikes[["kv_vs_replay_rel_l2",
                                                                               "kv_vs_reference_rel_l2"]].max().max())


def test_the_reference_noise_forces_its_own_near_tie_flips_and_measures_every_step(bf16):
    """The floors' float32 reference takes the bf16 reference's experts where it flipped at a near-tie, as qwenlab's
    forced steps do: every step is measured (none left out: on the 30B-A3B shape every step had such a flip, and
    the floors had come out as the bare absolute minimums), and rounding is measured, not another expert."""
    ckpt, reference, prompts, greedy, _, _ = bf16
    truth = load_reference_for(ckpt, dtype=torch.float32)
    run = dp.reference_steps(reference, prompts, greedy)
    noise = dp.step_noise(truth, prompts, greedy, run)
    assert (noise["steps"] == greedy["reference_tokens"]).all()
    label = noise["forced_steps"].idxmax()
    assert noise.loc[label, "forced_steps"] >= 1  # this fixture's float32 run flips an expert against its bf16 run
    gen, start = greedy.loc[label, "reference_ids"], len(prompts[label]) - 1
    plain = dp.step_metrics(run[label]["logits"][start:start + len(gen)].float(),
                            dp.reference_step_logits(truth, prompts[label], gen))
    assert plain["rel_l2"].max() > 5 * noise.loc[label, "max_rel_l2"]  # unforced: another expert's output


def test_a_dense_model_has_no_near_ties(tiny_dir):
    ckpt = load(tiny_dir, "bfloat16", "cpu")
    assert dp.routing_near_ties(ckpt.model, [1, 2, 3], [4, 5, 6]) == [None, None, None]


def test_a_routing_bug_still_fails_the_decode_steps(bf16):
    ckpt, reference, prompts, _, _, limits = bf16
    cfg = ckpt.model.config
    bug = planted_moe.renormalisation_flipped(1, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    with hooks(ckpt.model, replace=bug):
        greedy, _ = dp.greedy_parity(ckpt.model, reference, prompts, 12, ckpt.tokenizer.stop_ids, engine="eager")
    assert greedy["max_rel_l2_kv_vs_reference"].max() > 2 * limits["max_step_logits_rel_l2"]
    assert greedy["forced_max_rel_l2_vs_reference"].max() > 2 * limits["max_step_logits_rel_l2"]  # not forced away
    assert greedy["max_rel_l2_kv_vs_replay"].max() <= limits["max_step_logits_rel_l2"]  # the bug is in both paths
    assert greedy["routing_near_tie_steps"].sum() < greedy["kv_tokens"].sum() / 2
