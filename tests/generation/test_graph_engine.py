"""The decode engines. On the CPU: engine choice and what a user is told, the static-shape one-token forward the
CUDA graph captures (run eagerly here) against the ordinary cached forward, fused projections as registered
parameters. On CUDA (skipped elsewhere): graph and eager give identical greedy tokens in float32 (the graph's
greedy run chained on the device and read back one step behind, or step by step), the playground
runs the graph engine, and a deep copy and .to() of a fused model compute the same thing."""
import copy
import math

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.generation.chat import ChatSession
from qwenlab.generation.decode import generate
from qwenlab.generation.engine import Engine, compiled_graphs
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.hf_names import hf_state_dict
from qwenlab.model.kv_cache import KVCache, StaticKVCache
from qwenlab.model.loader import load

GREEDY = SamplingParams(max_new_tokens=24)


def test_auto_runs_eager_on_cpu_and_says_why_graph_refuses(tiny):
    ids = tiny.tokenizer.encode("Hello there")
    gen = generate(tiny.model, ids, GREEDY, stop_ids=(-1,), engine="auto")
    assert gen.engine == "eager" and "needs CUDA" in gen.engine_note and gen.compile_s == 0.0
    assert gen.to_json()["engine"] == "eager"
    assert generate(tiny.model, ids, GREEDY, stop_ids=(-1,), engine="eager").engine_note == ""
    assert gen.ids == generate(tiny.model, ids, GREEDY, stop_ids=(-1,), engine="eager").ids
    with pytest.raises(QwenlabError, match="engine graph: the graph engine needs CUDA"):
        generate(tiny.model, ids, GREEDY, engine="graph")


def test_engine_choice(tiny):
    with pytest.raises(QwenlabError, match="engine='fast'"):
        Engine(tiny.model, "fast")
    with pytest.raises(QwenlabError, match="compile='fast': choose one of layer, step, none"):
        Engine(tiny.model, "auto", compile="fast")
    assert Engine(tiny.model, "auto", compile=False).compile == "none" and Engine(tiny.model).compile == "layer"
    assert type(Engine(tiny.model, "auto").new_cache(16)) is KVCache
    with pytest.raises(QwenlabError, match="engine='fast'"):
        generate(tiny.model, [1, 2], GREEDY, engine="fast")
    other = load(tiny.path, "float32", "cpu").model
    with pytest.raises(QwenlabError, match="another model"):
        generate(other, [1, 2], GREEDY, engine=Engine(tiny.model, "eager"))


def test_chat_session_keeps_one_engine(tiny):
    engine = Engine(tiny.model, "auto")
    session = ChatSession(tiny.model, tiny.tokenizer, engine=engine)
    turn = session.send("Hi", SamplingParams(max_new_tokens=4))
    assert session.engine is engine
    assert turn.generation.engine == "eager" and "CUDA" in turn.generation.engine_note


def test_notebook_04_decodes_every_length_into_caches_of_one_length(tiny):
    """The graph engine's step is static-shaped: each new cache length compiles it again (131 s and 86 s on the
    Qwen3-32B shape, 0.2 s for another cache of a compiled length). Notebook 04 makes all its caches one length:
    the power of two holding its chat sessions, latency prompt and latency positions, within the model's context."""
    from qwenlab.checks import decode_parity as dp

    model = tiny.model  # context 4096
    assert dp.cache_length(model, sequences=[32 + 288], positions=[64, 256]) == dp.CHAT_MAX_LEN == 2048
    assert dp.cache_length(model, sequences=[352], positions=[64, 256, 1024, 2048]) == 4096
    assert dp.cache_length(model, chat=100, sequences=[600]) == 1024
    assert dp.cache_length(model, positions=[8000]) == 4096  # capped at the context
    engine = Engine(model, "eager", min_cache_len=2048)
    assert engine.pooled_cache(10).max_len == 2048 and engine.pooled_cache(3000).max_len == 4096
    assert Engine(model, "eager").pooled_cache(10).max_len == 512
    with pytest.raises(QwenlabError, match="min_cache_len=0"):
        Engine(model, "eager", min_cache_len=0)


def test_compiled_graphs_counts_what_torch_compile_makes():
    """The count each capture records (graphs_compiled): one for a new function or new shapes, none for a call
    its guards already cover."""
    double = torch.compile(lambda x: x * 2, dynamic=False, backend="eager")  # Dynamo counts; no compiler needed
    before = compiled_graphs()
    double(torch.ones(3))
    assert compiled_graphs() == before + 1
    double(torch.zeros(3))
    assert compiled_graphs() == before + 1
    double(torch.ones(4))
    assert compiled_graphs() == before + 2
    torch._dynamo.reset()  # leaves no compiled code (and its fake tensors) to the tests after this one


@torch.inference_mode()
def test_one_compiled_layer_serves_every_layer():
    """The engine compiles one decoder layer, not the whole step (a minute on the Qwen3-4B shape): run through the
    engine's compiled layer, a 12-layer static-shape step makes one graph (Dynamo's guards hold for every layer's
    parameters and cache view) and the logits of the eager step. A cache made outside inference mode (a chat
    session's; generate makes the pooled one inside) compiles nothing more: notebook 04's second capture did."""
    from qwenlab.generation.engine import layer_compiled
    from qwenlab.generation.graph import one_token
    from qwenlab.generation.kernels import DecodeKernels
    from qwenlab.model.config import config_from_dict
    from qwenlab.model.qwen3 import Qwen3, decode_attention
    from qwenlab.model.tiny import config_json

    cfg = config_from_dict(config_json("tiny-deep", num_hidden_layers=12, vocab_size=512))
    model = Qwen3(cfg).eval()
    slots = torch.arange(32)
    kernels = DecodeKernels(lambda q, k, v, pos: decode_attention(q, k, v, slots[None, :] <= pos))
    compiled = layer_compiled(kernels, backend="eager")  # Dynamo's guards are what this checks; no compiler needed
    logits = {}
    for name, run, graphs in (("eager", kernels, 0), ("compiled", compiled, 1), ("outside", compiled, 0)):
        with torch.inference_mode(name != "outside"):
            cache = StaticKVCache.for_config(cfg, max_len=32, dtype=torch.float32, device="cpu")
        model(torch.tensor([3, 1, 4]), cache=cache)
        cache.static_shapes = True
        before = compiled_graphs()
        logits[name] = [one_token(model, torch.tensor([[t]]), cache, run) for t in (1, 5, 9)]
        assert compiled_graphs() - before == graphs, name
        assert int(cache.pos) == 6
    for name in ("compiled", "outside"):
        for eager, compiled in zip(logits["eager"], logits[name]):
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_one_cache_length_compiles_the_graph_step_once(tiny_dir):
    """Notebook 04's use: a greedy decode (the pooled cache) and a chat session's cache, both of min_cache_len,
    are captured at one length: one compile, then captures that reuse it."""
    ckpt = load(tiny_dir, "float32", "cuda")
    engine = Engine(ckpt.model, "graph", fused=False, min_cache_len=1024)  # the layers compiled, none fused
    generate(ckpt.model, ckpt.tokenizer.encode("Hello"), GREEDY, stop_ids=(-1,), engine=engine)
    session = ChatSession(ckpt.model, ckpt.tokenizer, engine=engine, max_len=1024)
    session.send("Hi", SamplingParams(max_new_tokens=4))
    assert [c["max_len"] for c in engine.captures] == [1024, 1024]
    first, second = engine.captures  # Dynamo's own count: the second capture compiles nothing
    assert first["graphs_compiled"] >= 1 and second["graphs_compiled"] == 0, engine.captures
    assert second["kernels_s"] == 0.0 and second["first_call_s"] <= second["seconds"]
    # every capture, of any engine, runs on one side stream: cuBLAS keeps a 32 MiB workspace per stream it ran on
    third = Engine(ckpt.model, "graph", fused=False, min_cache_len=1024)
    generate(ckpt.model, ckpt.tokenizer.encode("Hello"), GREEDY, stop_ids=(-1,), engine=third)
    streams = {step.stream for e in (engine, third) for step in e._graphs.values()}
    assert len(streams) == 1, streams


def _static_steps(model, ids, new_tokens):
    """What the captured graph computes, run eagerly: prefill, then one-token steps with static shapes."""
    cache = StaticKVCache.for_config(model.config, max_len=64, dtype=model.dtype, device=model.device)
    logits = [model(torch.tensor(ids), cache=cache, last_only=True)[0, -1]]
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(logits[-1].argmax()))
        cache.static_shapes = True
        step = model(torch.tensor([[tokens[-1]]]), cache=cache, last_only=True)[0, -1]
        cache.static_shapes = False
        cache.replayed(1)
        logits.append(step)
    return tokens, torch.stack(logits[:-1]), cache


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.inference_mode()
def test_static_shape_step_equals_the_cached_forward(tiny_dir, attention):
    ckpt = load(tiny_dir, "float32", "cpu", attention=attention)
    model, ids = ckpt.model, ckpt.tokenizer.encode_chat([{"role": "user", "content": "Have you ever seen a UFO?"}])
    tokens, static_logits, cache = _static_steps(model, ids, 16)
    assert int(cache.pos) == cache.length == len(ids) + 16
    ref = generate(model, ids, SamplingParams(max_new_tokens=16), stop_ids=(-1,), engine="eager")
    assert tokens == ref.ids
    full = torch.tensor(ids + tokens[:-1])
    no_cache = model(full)[0, len(ids) - 1:]
    assert ((static_logits - no_cache).norm() / no_cache.norm()).item() < 1e-5


@torch.inference_mode()
def test_static_cache_crop_moves_the_device_position(tiny):
    cache = StaticKVCache.for_config(tiny.config, max_len=32, dtype=torch.float32, device="cpu", preallocate=False)
    assert cache.preallocate and cache.max_len == 32
    tiny.model(torch.arange(5), cache=cache)
    assert cache.length == 5 and int(cache.pos) == 5
    cache.crop(2)
    assert cache.length == 2 and int(cache.pos) == 2


@torch.inference_mode()
def test_fused_projections_are_registered_parameters_under_hf_names(tiny_dir, tiny):
    fused = load(tiny_dir, "float32", "cpu", fused=True).model
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert fused.fused and "qkv_proj" in attn._modules and "gate_up_proj" in mlp._modules
    assert not hasattr(attn, "q_proj") and "model.layers.0.self_attn.qkv_proj.weight" in fused.state_dict()
    plain, joined = hf_state_dict(tiny.model), hf_state_dict(fused)
    assert list(plain) == list(joined) and all(torch.equal(plain[n], joined[n]) for n in plain)
    ids = torch.tensor(tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog"))
    a, b = tiny.model(ids), fused(ids)
    assert ((a - b).norm() / a.norm()).item() < 1e-6
    twin = copy.deepcopy(fused)  # the fused weights are ordinary parameters: a copy computes the same thing
    assert torch.equal(twin(ids), b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fixture", ["tiny_dir", "untied_dir"])
def test_graph_and_eager_give_identical_greedy_tokens_on_cuda(fixture, dtype, fused, request):
    """The graph engine with its fused decoder layers (the default) or with each layer's forward compiled, against
    the eager engine's greedy tokens: all of them in float32; in bfloat16 up to a parting whose top-2 margin is
    within two units in the last place of the top logit (the paths sum in different orders; the fixture's logits
    are near 90, where bf16 steps by 0.5, and its float32 margins go down to 0.1)."""
    ckpt = load(request.getfixturevalue(fixture), dtype, "cuda")
    engine = Engine(ckpt.model, "graph", fused=fused)
    for prompt in ["Have you ever seen a UFO?", "Write a poem about the sea.", "你好, UFO?"]:
        ids = ckpt.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        tops = []
        eager = generate(ckpt.model, ids, SamplingParams(max_new_tokens=32), stop_ids=(-1,), engine="eager",
                         on_logits=lambda logits: tops.append(logits.float().topk(2).values))
        graph = generate(ckpt.model, ids, SamplingParams(max_new_tokens=32), stop_ids=(-1,), engine=engine)
        assert graph.engine == "graph", graph.engine_note
        assert ("decoder layers: fused Triton kernels" in graph.engine_note) == fused, graph.engine_note
        parting = next((i for i, (a, b) in enumerate(zip(graph.ids, eager.ids)) if a != b), None)
        if dtype == "float32" or parting is None:
            assert graph.ids == eager.ids
        else:
            top, second = tops[parting].flatten().tolist()
            ulp = 2.0 ** (math.floor(math.log2(abs(top))) - 7)  # bf16: 8 significant bits
            assert top - second <= 2 * ulp, (parting, top, second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("dtype,asked,gemv", [("float32", "wide", "wide-load (Gluon)"),
                                              ("bfloat16", "wide", "wide-load (Gluon)"),
                                              ("float32", "fma", "Triton FMA"), ("bfloat16", "fma", "Triton FMA"),
                                              ("bfloat16", "mma", "tensor-core (bf16 mma.sync, Gluon)")])
def test_nvfp4_graph_decode_multiplies_q_k_v_and_gate_up_in_one_launch_each_on_cuda(tiny_dir, dtype, asked, gemv,
                                                                                      monkeypatch):
    """NVFP4 linears stay separate modules (nothing fused at load); the graph's step runs q/k/v and gate/up as one
    GEMV launch each over their own weights (QWENLAB_NVFP4_GEMV: wide, the default, fma, or mma with bf16
    activations: on tensor cores), says
    which, and gives the eager engine's (one GEMV per linear) greedy tokens: all of them in float32; in bfloat16 up
    to a parting whose top-2 margin is within bf16 rounding of the logits (the two paths sum in different orders)."""
    if asked != "fma" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the Gluon GEMVs need compute capability 8.0")
    monkeypatch.setenv("QWENLAB_NVFP4_GEMV", asked)
    ckpt = load(tiny_dir, dtype, "cuda", quant="nvfp4")
    assert hasattr(ckpt.model.model.layers[0].self_attn, "q_proj")
    for prompt in ["Have you ever seen a UFO?", "Write a poem about the sea."]:
        ids = ckpt.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        margins = []
        eager = generate(ckpt.model, ids, SamplingParams(max_new_tokens=32), stop_ids=(-1,), engine="eager",
                         on_logits=lambda logits: margins.append(logits.float().topk(2).values.diff().abs().item()))
        graph = generate(ckpt.model, ids, SamplingParams(max_new_tokens=32), stop_ids=(-1,), engine="graph")
        assert graph.engine == "graph", graph.engine_note
        assert f"NVFP4: one {gemv} GEMV launch per q/k/v and per gate/up" in graph.engine_note
        assert "decoder layers: fused Triton kernels" in graph.engine_note, graph.engine_note
        parting = next((i for i, (a, b) in enumerate(zip(graph.ids, eager.ids)) if a != b), None)
        if dtype == "float32" or parting is None:
            assert graph.ids == eager.ids
        else:
            assert margins[parting] < 0.1, (parting, margins[parting])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_greedy_graph_decode_running_ahead_of_the_host_equals_the_step_by_step_one(tiny_dir):
    """Greedy graph decoding without on_logits chains the device's choices and reads them one step behind
    (decode.ChainedGreedy); with on_logits it goes step by step. Same tokens, stop reasons and cache, a stop token
    in the middle included, and a chat's next turn on that cache too."""
    ckpt = load(tiny_dir, "float32", "cuda")
    engine = Engine(ckpt.model, "graph")
    ids = ckpt.tokenizer.encode_chat([{"role": "user", "content": "Write a poem about the sea."}])
    params = SamplingParams(max_new_tokens=16)
    ahead = generate(ckpt.model, ids, params, stop_ids=(-1,), engine=engine)
    assert "read back one step behind" in ahead.engine_note
    steps = generate(ckpt.model, ids, params, stop_ids=(-1,), engine=engine, on_logits=lambda logits: None)
    assert "read back one step behind" not in steps.engine_note
    assert ahead.ids == steps.ids and ahead.stop_reason == steps.stop_reason == "max_new_tokens"
    k = next(k for k in range(3, len(ahead.ids)) if ahead.ids[k] not in ahead.ids[:k])  # its first occurrence
    stop = (ahead.ids[k],)
    caches = [engine.new_cache(256), engine.new_cache(256)]
    first = [generate(ckpt.model, ids, params, stop_ids=stop, cache=caches[0], engine=engine),
             generate(ckpt.model, ids, params, stop_ids=stop, cache=caches[1], engine=engine,
                      on_logits=lambda logits: None)]
    assert first[0].ids == first[1].ids == ahead.ids[:k + 1] and first[0].stop_reason == "stop_token"
    assert caches[0].length == caches[1].length == len(ids) + k
    more = ids + first[0].ids + ckpt.tokenizer.encode(" And then?")
    second = [generate(ckpt.model, more, params, stop_ids=(-1,), cache=c, engine=engine) for c in caches]
    assert second[0].ids == second[1].ids
    eager = generate(ckpt.model, more, params, stop_ids=(-1,), engine="eager")
    assert second[0].ids == eager.ids
    # one capture per static cache (the pooled one, then the two made here), each with its length and seconds
    assert [c["max_len"] for c in engine.captures] == [512, 256, 256]
    assert all(c["seconds"] > 0 for c in engine.captures)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.inference_mode()
def test_deep_copy_and_to_of_a_fused_cuda_model_give_identical_logits(tiny_dir):
    model = load(tiny_dir, "float32", "cuda").model
    assert model.fused  # fused by default on CUDA
    ids = torch.tensor([9707, 11, 1879, 0, 15920, 30, 2585, 2669], device="cuda")
    generate(model, ids.tolist(), SamplingParams(max_new_tokens=8), engine="graph")  # a graph generate first
    logits = model(ids)
    assert torch.equal(copy.deepcopy(model)(ids), logits)
    moved = copy.deepcopy(model).to("cpu")
    assert moved.model.rotary.inv_freq.device.type == "cpu"
    assert ((moved(ids.cpu()) - logits.cpu()).norm() / logits.cpu().norm()).item() < 1e-5
    back = moved.to("cuda")
    assert torch.equal(back(ids), logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton decode-attention kernel needs a GPU")
@pytest.mark.parametrize("dtype,heads,kv_heads,dim", [(torch.float32, 4, 2, 32), (torch.float32, 6, 3, 24),
                                                      (torch.bfloat16, 32, 8, 128)])
def test_split_k_decode_attention_matches_the_torch_path(dtype, heads, kv_heads, dim):
    from qwenlab.generation.decode_attention import decode_attention_static
    from qwenlab.model.qwen3 import decode_attention

    gen = torch.Generator("cuda").manual_seed(0)
    cases = [(300, n) for n in (1, 63, 64, 65, 200, 300)] + [(3000, n) for n in (1, 1024, 1025, 2999, 3000)]
    for slots, length in cases:  # one pass (<= 1024 slots) and split into chunks merged by a second kernel
        q = torch.randn(1, heads, 1, dim, device="cuda", generator=gen).to(dtype)
        k = torch.randn(1, kv_heads, slots, dim, device="cuda", generator=gen).to(dtype)
        v = torch.randn(1, kv_heads, slots, dim, device="cuda", generator=gen).to(dtype)
        k[:, :, length:] = float("nan")  # slots past the valid length must never be read into the result
        v[:, :, length:] = float("nan")
        pos = torch.tensor([length - 1], device="cuda")
        ours = decode_attention_static(q, k, v, pos).float()
        ref = decode_attention(q.double(), k[:, :, :length].double(), v[:, :, :length].double()).float()
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2), (slots, length, rel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton GEMV needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_matches_a_float64_matmul(dtype):
    from qwenlab.generation.gemv import gemv

    gen = torch.Generator("cuda").manual_seed(0)
    for n, k, bias in ((6144, 2560, False), (2560, 9728, False), (97, 200, True), (1, 16, True)):
        w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(dtype)
        x = torch.randn(1, 1, k, device="cuda", generator=gen).to(dtype)
        b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        out = gemv(x, w, b)
        assert out.shape == (1, 1, n) and out.dtype == dtype
        assert ((out.double() - ref).norm() / ref.norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_planted_bugs_are_named_after_a_graph_generate_on_a_fused_model(tiny_dir):
    """The fused q/k/v and gate/up weights are the model's parameters: a bug planted in them after the graph engine
    decoded is seen by the next capture (before, the fused copy kept computing with the old weights)."""
    from qwenlab.activations import planted
    from qwenlab.activations.diff import diff_dumps
    from qwenlab.activations.reference import capture_reference, load_reference

    ckpt = load(tiny_dir, "float32", "cuda")
    model = ckpt.model
    assert model.fused
    ids = ckpt.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert generate(model, ids, SamplingParams(max_new_tokens=8), engine="graph").engine == "graph"
    ref = capture_reference(load_reference(tiny_dir, torch.float32, "cuda"), ids)
    a, b = model.model.layers[1], model.model.layers[2]
    only = {  # one fused parameter swapped between layers 1 and 2
        "qkv": (lambda: {"model.layers.1.self_attn.qkv_proj.weight": b.self_attn.qkv_proj.weight,
                         "model.layers.2.self_attn.qkv_proj.weight": a.self_attn.qkv_proj.weight},
                "layers.1.attn.q_proj"),
        "gate_up": (lambda: {"model.layers.1.mlp.gate_up_proj.weight": b.mlp.gate_up_proj.weight,
                             "model.layers.2.mlp.gate_up_proj.weight": a.mlp.gate_up_proj.weight},
                    "layers.1.mlp.gate_proj")}
    bugs = planted.standard_bugs(model) + [planted.PlantedBug(f"swap {k}", k, where, overrides=fn)
                                           for k, (fn, where) in only.items()]
    floors = {"float32": 1e-4}  # CUDA's float32 kernels (flash SDPA) against transformers' eager: about 1e-6
    for bug in bugs:
        found = diff_dumps(bug.capture(model, ids), ref, floors=floors).first_divergence
        assert bug.localised(found), (bug.name, found)
    assert diff_dumps(planted.capture_qwenlab(model, ids), ref, floors=floors).passed  # the model is as it was
