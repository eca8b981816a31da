"""qwenlab's forward against HF transformers (eager, float32) on two differently shaped checkpoints."""
import pytest
import torch

from qwenlab.activations.diff import diff_dumps, tensor_metrics
from qwenlab.activations.names import canonical_names
from qwenlab.activations.reference import capture_reference, load_reference
from qwenlab.model.loader import load
from qwenlab.model.probe import Probe

PROMPTS = ["Have you ever seen a UFO?", "你好, UFO? 🛸 def f(x): return x**2\r\n\t<|im_end|>"]


def _capture_both(ckpt, ref_model, ids, attention):
    ckpt.model.set_attention(attention)
    probe = Probe()
    ckpt.model(torch.tensor(ids), probe=probe)
    return probe.tensors, capture_reference(ref_model, ids)


@pytest.fixture(scope="module", params=["tiny", "tiny-untied"])
def pair(request, tiny_dir, untied_dir):
    path = tiny_dir if request.param == "tiny" else untied_dir
    return load(path, "float32", "cpu"), load_reference(path)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_canonical_activation_matches_reference(pair, attention, prompt):
    ckpt, ref_model = pair
    ids = ckpt.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    cand, ref = _capture_both(ckpt, ref_model, ids, attention)
    expected = canonical_names(ckpt.config.num_hidden_layers)
    assert sorted(ref) == sorted(expected), "the reference capture must provide every canonical name"
    result = diff_dumps(cand, ref, dtype="float32")
    assert result.only_in_candidate == [] and result.only_in_reference == []
    assert result.first_divergence is None, result.first_divergence_row
    assert tensor_metrics(cand["logits"], ref["logits"])["rel_l2"] < 1e-5
    assert result.logits["top1_agreement"] == 1.0


def test_shapes_follow_the_dump_contract(tiny, tiny_ref):
    ids = tiny.tokenizer.encode("Hello world")
    cand, ref = _capture_both(tiny, tiny_ref, ids, "sdpa")
    cfg = tiny.config
    T = len(ids)
    assert cand["embed"].shape == (T, cfg.hidden_size)
    assert cand["layers.0.attn.q_proj"].shape == (T, cfg.num_attention_heads * cfg.head_dim)
    assert cand["layers.0.attn.q_norm"].shape == (T, cfg.num_attention_heads, cfg.head_dim)
    assert cand["layers.0.attn.k_rope"].shape == (T, cfg.num_key_value_heads, cfg.head_dim)
    assert cand["logits"].shape == (T, cfg.vocab_size)
    for name in cand:
        assert cand[name].shape == ref[name].shape, name


def test_parity_tests_can_fail(tiny, tiny_ref):
    """The same comparison flags a wrong RoPE theta at the first tensor it touches."""
    ids = tiny.tokenizer.encode("Have you ever seen a UFO? Yes, twice.")
    tiny.model.rope_theta = tiny.config.rope_theta / 10
    try:
        cand, ref = _capture_both(tiny, tiny_ref, ids, "sdpa")
    finally:
        tiny.model.rope_theta = tiny.config.rope_theta
    result = diff_dumps(cand, ref, dtype="float32")
    assert result.first_divergence == "layers.0.attn.q_rope"


def test_tied_head_shares_the_embedding_and_untied_does_not(tiny, untied_dir):
    assert tiny.model.lm_head.weight.data_ptr() == tiny.model.model.embed_tokens.weight.data_ptr()
    untied = load(untied_dir, "float32", "cpu").model
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_probe_absent_records_nothing_and_gives_same_logits(tiny):
    ids = torch.tensor(tiny.tokenizer.encode("probe or not"))
    probe = Probe(include=["layers.1.*"])
    with_probe = tiny.model(ids, probe=probe)
    assert set(probe.tensors) and all(n.startswith("layers.1.") for n in probe.tensors)
    assert torch.equal(with_probe, tiny.model(ids))
