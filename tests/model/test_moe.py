"""Qwen3-MoE: config, names, loading and the forward against transformers' Qwen3MoeForCausalLM (eager experts), on
the tiny-moe fixture and on a checkpoint transformers itself wrote; decoding through the KV cache; on CUDA (skipped
without), bf16 inside the floors measured from transformers' own bf16 noise."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwenlab.activations.capture import capture_qwenlab
from qwenlab.activations.diff import diff_dumps, tensor_metrics
from qwenlab.activations.floors import Gates
from qwenlab.activations.names import canonical_names
from qwenlab.activations.reference import capture_reference, load_reference, reference_generate
from qwenlab.checks import layer_diffs as ld
from qwenlab.checks.nbutil import load_thresholds
from qwenlab.errors import QwenlabError
from qwenlab.generation.decode import generate
from qwenlab.generation.engine import graph_unavailable
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.config import config_from_dict, is_moe_layer, read_config
from qwenlab.model.hf_names import hf_shapes
from qwenlab.model.loader import load
from qwenlab.model.moe import SparseMoE
from qwenlab.model.placement import device_of
from qwenlab.model.tiny import config_json

PROMPTS = ["Have you ever seen a UFO?", "你好, UFO? 🛸 def f(x): return x**2\r\n\t<|im_end|>"]


def _hf_config(**overrides):
    from transformers import Qwen3MoeConfig

    base = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=48,
                norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3], max_position_embeddings=512,
                tie_word_embeddings=False)
    return Qwen3MoeConfig(**(base | overrides))


@pytest.fixture(scope="module")
def hf_written(tmp_path_factory, moe_dir):
    """A checkpoint written by transformers' own save_pretrained (random init, decoder_sparse_step 2, one dense
    layer by mlp_only_layers, no renormalisation, untied) with the tiny fixture's tokenizer."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(_hf_config())
    with torch.no_grad():  # transformers' init (std 0.02) routes every token alike; spread the router out
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "hf-moe"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        shutil.copyfile(moe_dir / name, path / name)
    return path


def test_config_reads_both_spellings_and_hashes_apart_from_dense(moe_dir, hf_written, tiny_dir):
    cfg = read_config(moe_dir)
    assert cfg.is_moe and cfg.architecture == "Qwen3MoeForCausalLM"
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert cfg.norm_topk_prob and cfg.mlp_only_layers == (0,)
    written = read_config(hf_written)  # transformers 5 writes num_experts as num_local_experts
    assert json.loads((hf_written / "config.json").read_text())["num_local_experts"] == written.num_experts == 6
    dense = read_config(tiny_dir)
    assert not dense.is_moe and dense.config_hash() != cfg.config_hash()
    assert dense.config_hash() == "e45c2d79a816034b", "a dense config hashes as before the MoE fields existed"


def test_moe_layers_follow_transformers_rule():
    from transformers import Qwen3MoeForCausalLM

    for step, only in ((1, []), (2, [3]), (3, [0, 2]), (1, [0, 1, 2, 3])):
        hf_cfg = _hf_config(decoder_sparse_step=step, mlp_only_layers=only, num_hidden_layers=6)
        with torch.device("meta"):
            hf = Qwen3MoeForCausalLM(hf_cfg)
        ours = config_from_dict(hf_cfg.to_dict())
        assert [is_moe_layer(ours, i) for i in range(6)] == \
            [hasattr(layer.mlp, "experts") for layer in hf.model.layers], (step, only)


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok = 9 must be between 1 and 8"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok = 0 must be between 1 and 8"),
    ({"num_experts": 0}, "num_experts = 0 must be at least 1"),
    ({"num_experts": "8"}, "num_experts must be an integer, not '8'"),
    ({"moe_intermediate_size": True}, "moe_intermediate_size must be an integer, not True"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step = 0 must be at least 1"),
    ({"mlp_only_layers": [3]}, "mlp_only_layers entry 3 is not a layer index 0-2"),
    ({"mlp_only_layers": 0}, "mlp_only_layers must be a list of layer indices, not 0"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false, not 'yes'"),
    ({"moe_intermediate_size": None}, "missing required key 'moe_intermediate_size'"),
    ({"intermediate_size": None}, "missing required key 'intermediate_size'"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "is not Qwen3"),
])
def test_bad_moe_config_is_one_line(change, message):
    raw = {k: v for k, v in (config_json("tiny-moe") | change).items() if v is not None}
    with pytest.raises(QwenlabError, match=message) as e:
        config_from_dict(raw, "x/config.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("x/config.json: ")


def test_all_sparse_layers_need_no_dense_width():
    raw = config_json("tiny-moe", mlp_only_layers=[])
    del raw["intermediate_size"]
    assert config_from_dict(raw).intermediate_size == 0


def test_checkpoint_names_are_what_transformers_writes(hf_written):
    with safe_open(str(hf_written / "model.safetensors"), "pt") as f:
        stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert hf_shapes(read_config(hf_written)) == stored
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in stored and "model.layers.1.mlp.gate.weight" in stored
    assert "model.layers.0.mlp.gate_proj.weight" in stored, "decoder_sparse_step 2: layer 0 is dense"


def test_30b_a3b_shape_is_30_5b_parameters():
    cfg = config_from_dict(config_json("qwen3-30b-a3b"))
    shapes = hf_shapes(cfg)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 30_532_122_624
    assert len([n for n in shapes if ".mlp.experts." in n]) == 48 * 128 * 3


def _compare(ckpt, ref_model, ids, attention):
    cand, ref = capture_qwenlab(ckpt.model, ids, attention=attention), capture_reference(ref_model, ids)
    assert list(cand) == list(ref) == canonical_names(ckpt.config)
    result = diff_dumps(cand, ref, dtype="float32")
    assert result.passed, result.first_divergence_row
    assert tensor_metrics(cand["logits"], ref["logits"])["rel_l2"] < 1e-5
    for name in cand:
        if name.endswith("router_ids"):
            assert cand[name].dtype == torch.int64 and torch.equal(cand[name], ref[name]), name
            assert result.routing[name]["agreement"] == 1.0
    return cand, ref


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_tiny_moe_matches_transformers(moe, moe_ref, prompt, attention):
    ids = moe.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    cand, _ = _compare(moe, moe_ref, ids, attention)
    cfg = moe.config
    assert isinstance(moe.model.model.layers[1].mlp, SparseMoE) and "layers.0.mlp.gate_proj" in cand
    T = len(ids)
    assert cand["layers.1.mlp.router_logits"].shape == (T, cfg.num_experts)
    assert cand["layers.1.mlp.router_ids"].shape == cand["layers.1.mlp.router_weights"].shape == (T, 2)
    assert cand["layers.2.mlp.experts"].shape == (T, cfg.hidden_size)
    weights = cand["layers.2.mlp.router_weights"]
    assert torch.allclose(weights.sum(-1), torch.ones(T)), "norm_topk_prob: the k weights sum to one"


def test_experts_forced_on_both_sides_still_match_transformers(moe, moe_ref):
    """capture_reference(routing=...) gives transformers' router the experts qwenlab's forcing hooks give qwenlab's
    (notebook 04's floors force the float32 reference like notebook 03 forces the candidate): the same experts
    forced on both sides keep them equal to float32 rounding, and the forced choice is what both record."""
    from qwenlab.activations.forced_routing import forcing_hooks

    ids = moe.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    own = capture_reference(moe_ref, ids, include=["layers.*.mlp.router_ids"])
    k, E = moe.config.num_experts_per_tok, moe.config.num_experts
    forced = {1: {t: [e for e in range(E) if e not in own["layers.1.mlp.router_ids"][t].tolist()][:k]
                  for t in (0, 3)}}
    ref = capture_reference(moe_ref, ids, routing=forced)
    cand = capture_qwenlab(moe.model, ids, replace=forcing_hooks(forced, moe.config.norm_topk_prob))
    for t, experts in forced[1].items():
        assert ref["layers.1.mlp.router_ids"][t].tolist() == cand["layers.1.mlp.router_ids"][t].tolist() == experts
    assert tensor_metrics(cand["logits"], ref["logits"])["rel_l2"] < 1e-5
    plain = capture_reference(moe_ref, ids, include=["logits"])["logits"]
    assert tensor_metrics(plain, ref["logits"])["rel_l2"] > 1e-3  # the forcing did change the reference's output


def test_checkpoint_transformers_wrote_matches_transformers(hf_written):
    ckpt, ref_model = load(hf_written, "float32", "cpu"), load_reference(hf_written)
    ids = ckpt.tokenizer.encode("Routing without renormalisation, every other layer sparse: 1, 2, 3.")
    cand, _ = _compare(ckpt, ref_model, ids, "sdpa")
    assert "layers.1.mlp.router_ids" in cand and "layers.0.mlp.act" in cand and "layers.3.mlp.act" in cand
    assert not torch.allclose(cand["layers.1.mlp.router_weights"].sum(-1), torch.ones(len(ids)))
    assert len(cand["layers.1.mlp.router_ids"].unique()) > 2, "the tokens go to several experts"


def test_kv_replay_and_transformers_generate_the_same(moe, moe_ref):
    ids = moe.tokenizer.encode_chat([{"role": "user", "content": "Name three colours."}])
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    logits = {}
    runs = {mode: generate(moe.model, ids, params, stop_ids=(), mode=mode, engine="eager",
                           on_logits=lambda x, mode=mode: logits.setdefault(mode, []).append(x.clone()))
            for mode in ("kv", "replay")}
    assert runs["kv"].ids == runs["replay"].ids
    assert len(logits["kv"]) == len(logits["replay"]) == 24
    assert max(tensor_metrics(a, b)["rel_l2"] for a, b in zip(logits["kv"], logits["replay"])) < 1e-5
    assert runs["kv"].ids == reference_generate(moe_ref, ids, 24)


def test_missing_or_misshaped_expert_is_one_line(moe_dir, tmp_path):
    weights = load_file(str(moe_dir / "model.safetensors"))
    for case, change in (("missing", lambda w: w.pop("model.layers.2.mlp.experts.5.up_proj.weight")),
                         ("shape", lambda w: w.update({"model.layers.1.mlp.gate.weight": torch.zeros(7, 64)}))):
        folder = tmp_path / case
        shutil.copytree(moe_dir, folder)
        broken = dict(weights)
        change(broken)
        save_file(broken, str(folder / "model.safetensors"))
        with pytest.raises(QwenlabError) as e:
            load(folder, "float32", "cpu")
        assert "\n" not in str(e.value)
        assert ("model.layers.2.mlp.experts.5.up_proj.weight is missing" if case == "missing" else
                "model.layers.1.mlp.gate.weight has shape [7, 64], config.json implies [8, 64]") in str(e.value)


def test_fused_3d_experts_are_named_as_such(moe_dir, tmp_path):
    weights = load_file(str(moe_dir / "model.safetensors"))
    layer = "model.layers.1.mlp.experts"
    gate_up = torch.stack([torch.cat([weights.pop(f"{layer}.{e}.gate_proj.weight"),
                                      weights.pop(f"{layer}.{e}.up_proj.weight")]) for e in range(8)])
    weights[f"{layer}.gate_up_proj"] = gate_up
    weights[f"{layer}.down_proj"] = torch.stack([weights.pop(f"{layer}.{e}.down_proj.weight") for e in range(8)])
    shutil.copytree(moe_dir, tmp_path / "fused")
    save_file(weights, str(tmp_path / "fused" / "model.safetensors"))
    with pytest.raises(QwenlabError, match=r"experts\.0\.gate_proj\.weight is missing .* holds "
                                           r"model\.layers\.1\.mlp\.experts\.gate_up_proj \[8, 64, 64\]"):
        load(tmp_path / "fused", "float32", "cpu")


def test_a_layer_s_experts_live_on_the_layer_s_device():
    layers = ["cpu", "cuda:0", "cuda:1"]
    assert device_of("model.layers.2.mlp.experts.7.down_proj.weight", layers, True) == torch.device("cuda:1")
    assert device_of("model.layers.1.mlp.gate.weight", layers, True) == torch.device("cuda:0")


@pytest.mark.parametrize("fields", [{"device_map": ["cpu", "cpu", "cpu"]}, {"fused": True}])
def test_split_or_fused_gives_the_same_activations(moe_dir, moe, moe_ref, fields):
    other = load(moe_dir, "float32", "cpu", **fields)
    ids = moe.tokenizer.encode("split across devices, or q/k/v fused (the experts stay one linear each)")
    if "fused" in fields:
        assert hasattr(other.model.model.layers[0].mlp, "gate_up_proj") and hasattr(
            other.model.model.layers[1].mlp.experts[0], "gate_proj")
        assert diff_dumps(capture_qwenlab(other.model, ids), capture_reference(moe_ref, ids)).passed
    else:
        a, b = capture_qwenlab(moe.model, ids), capture_qwenlab(other.model, ids)
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_graph_engine_declines_moe(moe, monkeypatch):
    class OnCuda:
        device, is_split, config = torch.device("cuda"), False, moe.config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "MoE" in graph_unavailable(OnCuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_moe_in_bf16_on_cuda_is_inside_its_measured_floors(moe_dir):
    gates = Gates.from_thresholds(load_thresholds(None, "03_layer_diffs"))
    ckpt = load(moe_dir, "bfloat16", "cuda")
    ref, truth = load_reference(moe_dir, torch.bfloat16, "cuda"), load_reference(moe_dir, torch.float32, "cuda")
    diffs = ld.diff_prompts(ckpt.model, ref, ckpt.tokenizer, PROMPTS, gates, truth_model=truth)
    assert all(d.result.passed for d in diffs), [d.result.first_divergence_row for d in diffs]
    assert ld.first_isolated(ld.isolated_table(diffs)) is None
    assert ld.routing_table(diffs)["clear_margin"].sum() == 0, ld.routing_flips(diffs)
    gen = generate(ckpt.model, ckpt.tokenizer.encode("Hello"), SamplingParams(max_new_tokens=8), engine="auto")
    assert gen.engine == "eager" and "MoE" in gen.engine_note


def test_30b_a3b_recipe_draws_a_checkpoint_both_sides_load(tmp_path):
    """The qwen3-30b-a3b preset's bf16 recipe (torch-drawn, 16 shards with an index, Qwen's v4 config spelling),
    shrunk to two narrow layers: qwenlab and transformers read the same model from it."""
    from qwenlab.model.tiny import _shards, write_files

    cfg = config_json("qwen3-30b-a3b", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32)
    assert cfg["num_experts"] == 8 and "rope_theta" in cfg and cfg["torch_dtype"] == "bfloat16"
    write_files(tmp_path, cfg, _shards(cfg, "qwen3-30b-a3b", 0, "cpu"))
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) == \
        len(hf_shapes(read_config(tmp_path)))
    ckpt = load(tmp_path, "float32", "cpu")
    _compare(ckpt, load_reference(tmp_path), ckpt.tokenizer.encode("Thirty billion parameters, three active."),
             "sdpa")
