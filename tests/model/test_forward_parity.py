"""qwenlab's forward against HF transformers (eager, float32) on two differently shaped checkpoints, and the hook
points: read, replace, no cost when unused."""
import pytest
import torch

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import diff_dumps, tensor_metrics
from qwenlab.activations.names import canonical_names
from qwenlab.activations.planted import rope_theta_off, skip_norm
from qwenlab.activations.reference import capture_reference, load_reference
from qwenlab.errors import QwenlabError
from qwenlab.model.hooks import hook_points, hooks
from qwenlab.model.loader import load

PROMPTS = ["Have you ever seen a UFO?", "你好, UFO? 🛸 def f(x): return x**2\r\n\t<|im_end|>"]


def _capture_both(ckpt, ref_model, ids, attention, **kwargs):
    return capture_qwenlab(ckpt.model, ids, attention=attention, **kwargs), capture_reference(ref_model, ids)


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
    assert list(ref) == expected == list(cand), "both captures give every canonical name, in forward order"
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
    cand, ref = _capture_both(tiny, tiny_ref, ids, "sdpa", overrides=rope_theta_off(tiny.model, 0.1)())
    result = diff_dumps(cand, ref, dtype="float32")
    assert result.first_divergence == "layers.0.attn.q_rope"
    assert torch.equal(capture_qwenlab(tiny.model, ids)["logits"], ref["logits"]) or \
        diff_dumps(capture_qwenlab(tiny.model, ids), ref).passed  # the model itself was left as it was


def test_tied_head_shares_the_embedding_and_untied_does_not(tiny, untied_dir):
    assert tiny.model.lm_head.weight.data_ptr() == tiny.model.model.embed_tokens.weight.data_ptr()
    untied = load(untied_dir, "float32", "cpu").model
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_hooks_read_what_they_name_and_cost_nothing_unused(tiny):
    ids = torch.tensor(tiny.tokenizer.encode("hooks or not"))
    with torch.inference_mode(), hooks(tiny.model, read=["layers.1.*"]) as rec:
        hooked = tiny.model(ids)
    assert set(rec.tensors) and all(n.startswith("layers.1.") for n in rec.tensors)
    assert all(not p.fns for p in hook_points(tiny.model).values()), "hooks are removed on exit"
    with torch.inference_mode():
        assert torch.equal(hooked, tiny.model(ids))
    with pytest.raises(QwenlabError, match="no hook point"):
        with hooks(tiny.model, read=["layers.1.attn.q_prj"]):
            pass
    with pytest.raises(QwenlabError, match="batch of 2"), torch.inference_mode():
        with hooks(tiny.model, read=["embed"]):
            tiny.model(torch.stack([ids, ids]))


def test_patching_a_layer_output_with_the_reference_makes_every_later_tensor_match(tiny, tiny_ref):
    """Layer 1's output replaced by the reference's: whatever went wrong before, everything after is the reference's
    computation on the reference's input (here layer 0 skips its q_norm: layers 0-1 diverge, 2-3 match again)."""
    ids = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    ref = capture_reference(tiny_ref, ids)
    patch = skip_norm(0) | {"layers.1.output": lambda x, name: ref[name].to(x)[None]}
    result = diff_dumps(capture_qwenlab(tiny.model, ids, replace=patch), ref, dtype="float32")
    assert result.first_divergence == "layers.0.attn.q_norm"
    assert next(r for r in result.rows if r["name"] == "layers.1.attn.o_proj")["exceeds"]
    later = [r for r in result.rows if (r["layer"] or 0) >= 2 or r["name"] in ("norm", "logits")]
    assert later and all(r["rel_l2"] < 1e-5 for r in later), [r["name"] for r in later if r["rel_l2"] >= 1e-5]


def test_eager_attention_for_one_capture_leaves_the_model_as_it_was(tiny):
    ids = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert tiny.model.attention == "sdpa"
    capture_qwenlab(tiny.model, ids, attention="eager")
    assert tiny.model.attention == "sdpa"
