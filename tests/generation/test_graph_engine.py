"""The decode engines. On the CPU: engine choice and fallback, the static-shape one-token forward the CUDA graph
captures (run eagerly here) against the ordinary cached forward, fused projections as views. On CUDA (skipped
elsewhere): graph and eager give identical greedy tokens in float32."""
import copy

import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.generation.chat import ChatSession
from qwenlab.generation.decode import choose_engine, generate, new_cache
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.kv_cache import KVCache, StaticKVCache
from qwenlab.model.loader import load
from qwenlab.model.probe import Probe

GREEDY = SamplingParams(max_new_tokens=24)


def test_auto_falls_back_to_eager_on_cpu_and_says_why(tiny):
    ids = tiny.tokenizer.encode("Hello there")
    for engine in ("auto", "graph"):
        gen = generate(tiny.model, ids, GREEDY, stop_ids=(-1,), engine=engine)
        assert gen.engine == "eager" and "CUDA" in gen.engine_note and gen.compile_s == 0.0
        assert gen.to_json()["engine"] == "eager"
    assert generate(tiny.model, ids, GREEDY, stop_ids=(-1,), engine="eager").engine_note == ""
    assert generate(tiny.model, ids, GREEDY, stop_ids=(-1,), engine="auto").ids == \
        generate(tiny.model, ids, GREEDY, stop_ids=(-1,), engine="eager").ids


def test_engine_choice(tiny):
    assert choose_engine("eager", tiny.model) == ("eager", "")
    with pytest.raises(QwenlabError, match="engine='fast'"):
        choose_engine("fast", tiny.model)
    assert type(new_cache(tiny.model, 16, engine="auto")) is KVCache
    with pytest.raises(QwenlabError, match="engine='fast'"):
        generate(tiny.model, [1, 2], GREEDY, engine="fast")


def test_chat_session_takes_an_engine(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer, engine="graph")
    turn = session.send("Hi", SamplingParams(max_new_tokens=4))
    assert turn.generation.engine == "eager" and "CUDA" in turn.generation.engine_note


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
        cache.length += 1
        logits.append(step)
    return tokens, torch.stack(logits[:-1]), cache


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_static_shape_step_equals_the_cached_forward(tiny, attention):
    model = copy.deepcopy(tiny.model).set_attention(attention)
    ids = tiny.tokenizer.encode_chat([{"role": "user", "content": "Have you ever seen a UFO?"}])
    tokens, static_logits, cache = _static_steps(model, ids, 16)
    assert int(cache.pos) == cache.length == len(ids) + 16
    ref = generate(model, ids, SamplingParams(max_new_tokens=16), stop_ids=(-1,), engine="eager")
    assert tokens == ref.ids
    full = torch.tensor(ids + tokens[:-1])
    no_cache = model(full)[0, len(ids) - 1:]
    assert ((static_logits - no_cache).norm() / no_cache.norm()).item() < 1e-5


def test_static_cache_crop_moves_the_device_position(tiny):
    cache = StaticKVCache.for_config(tiny.config, max_len=32, dtype=torch.float32, device="cpu", preallocate=False)
    assert cache.preallocate and cache.max_len == 32
    tiny.model(torch.arange(5), cache=cache)
    assert cache.length == 5 and int(cache.pos) == 5
    cache.crop(2)
    assert cache.length == 2 and int(cache.pos) == 2


def test_fused_projections_are_views_and_change_nothing(tiny_dir):
    ckpt = load(tiny_dir, "float32", "cpu")
    model = ckpt.model
    ids = torch.tensor(ckpt.tokenizer.encode("The quick brown fox"))
    before_probe = Probe()
    before = model(ids, probe=before_probe)
    keys, nbytes = list(model.state_dict()), _storage_bytes(model)
    model.fuse_projections().fuse_projections()
    after_probe = Probe()
    after = model(ids, probe=after_probe)
    assert list(model.state_dict()) == keys and _storage_bytes(model) == nbytes
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv = attn.qkv_proj.weight
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.k_proj.weight.data_ptr() == qkv[attn.q_proj.out_features:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_proj.weight[mlp.gate_proj.out_features:].data_ptr()
    assert "qkv_proj" not in dict(model.named_modules()).get("model.layers.0.self_attn")._modules
    assert list(after_probe.tensors) == list(before_probe.tensors)
    assert ((after - before).norm() / before.norm()).item() < 1e-6
    with torch.no_grad():
        attn.k_proj.weight.zero_()  # an in-place change through the HF name reaches the fused storage
    assert qkv[attn.q_proj.out_features:attn.q_proj.out_features + attn.k_proj.out_features].abs().sum() == 0


def _storage_bytes(model) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    for layer in model.model.layers:
        for fused in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
            if fused is not None:
                storages[fused.weight.untyped_storage().data_ptr()] = fused.weight.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("fixture", ["tiny_dir", "untied_dir"])
def test_graph_and_eager_give_identical_greedy_tokens_on_cuda(fixture, request):
    ckpt = load(request.getfixturevalue(fixture), "float32", "cuda")
    for prompt in ["Have you ever seen a UFO?", "Write a poem about the sea.", "你好, UFO?"]:
        ids = ckpt.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        eager = generate(ckpt.model, ids, SamplingParams(max_new_tokens=32), stop_ids=(-1,), engine="eager")
        graph = generate(ckpt.model, ids, SamplingParams(max_new_tokens=32), stop_ids=(-1,), engine="graph")
        assert graph.engine == "graph", graph.engine_note
        assert graph.ids == eager.ids


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
