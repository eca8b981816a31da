"""Corrupt weights or a config that does not explain the file: refused at load with one line, never wrong output."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qwenlab.model.loader import load_model

Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("name, at, value", [
    (f"{Q}.weight", (3, 5), float("nan")),
    ("model.layers.2.post_attention_layernorm.weight", (7,), float("inf")),
    ("model.embed_tokens.weight", (151935, 63), float("-inf")),
])
def test_nonfinite_weight_is_refused(ckpt, tmp_path, fails, rewrite_weights, name, at, value):
    rewrite_weights(ckpt, lambda t: t[name].__setitem__(at, value))
    out = tmp_path / "dump.safetensors"
    err = fails("capture", "--model", ckpt, "--prompt", "hi", "--impl", "qwenlab", "--out", out,
                needles=(name, "holds NaN or infinite values", f"at {list(at)}"))
    assert "model.safetensors" in err and not out.exists()


def test_a_nan_block_scale_is_refused(nvfp4_ct, tmp_path, fails, rewrite_weights):
    folder = shutil.copytree(nvfp4_ct, tmp_path / "ct")
    rewrite_weights(folder, lambda t: t[f"{Q}.weight_scale"].view(torch.uint8).__setitem__((1, 2), 0x7F))  # E4M3 NaN
    fails("generate", "--model", folder, "--prompt", "hi", needles=(f"{Q}.weight_scale", "NaN", "[1, 2]"))


def test_more_layers_in_the_file_than_in_the_config(ckpt, fails, edit_json):
    edit_json(ckpt / "config.json", lambda c: c.update(num_hidden_layers=3))
    fails("generate", "--model", ckpt, "--prompt", "hi",
          needles=("model.layers.3.", "layer 3", "num_hidden_layers=3", "10 more", "--allow-unknown-tensors"))
    model = load_model(ckpt, "float32", "cpu", allow_unknown=True)  # asked for: the extra layer is left unread
    assert len(model.model.layers) == 3


def test_an_unknown_tensor_is_refused_unless_allowed(ckpt, fails, rewrite_weights):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.1.mlp.extra_proj.weight": torch.zeros(4, 4)}))
    fails("generate", "--model", ckpt, "--prompt", "hi",
          needles=("model.layers.1.mlp.extra_proj.weight", "is not a tensor of a Qwen3 with this config.json"))
    assert load_model(ckpt, "float32", "cpu", allow_unknown=True).config.num_hidden_layers == 4


def test_a_tied_model_may_store_its_head(ckpt, rewrite_weights):
    """transformers ties lm_head to the embedding and ignores a stored copy: so does qwenlab (not 'unknown')."""
    rewrite_weights(ckpt, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = load_model(ckpt, "float32", "cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_the_corrupt_file_is_left_as_it_was(ckpt, cli, rewrite_weights):
    rewrite_weights(ckpt, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    before = sorted(p.name for p in ckpt.iterdir())
    assert cli("generate", "--model", ckpt, "--prompt", "hi")[0] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert torch.isnan(load_file(str(ckpt / "model.safetensors"))["model.norm.weight"][0])
