"""Deterministic Qwen3 (and Qwen3-MoE) checkpoints in HF layout: the embedded default model and test/benchmark
shapes."""
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from qwenlab.atomic import atomic_dir
from qwenlab.errors import QwenlabError
from qwenlab.model.config import config_from_dict, is_moe_layer
from qwenlab.model.hf_names import hf_shapes
from qwenlab.model.tokenizer_files import TOKENIZER_FILES, qwen3_tokenizer_dir
from qwenlab.paths import DATA_DIR
from qwenlab.quant.writer import room_for

BASE = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1_000_000.0, hidden_act="silu",
            attention_bias=False, use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)

PRESETS = {
    # q heads x head_dim (128) != hidden (64), GQA 4:2, tied embeddings, 4.x-free 5.x-style config.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True,
                 dtype="float32", style="v5", shards=1),
    # A differently shaped second fixture: untied head, sharded safetensors, transformers 4.x config spelling.
    "tiny-untied": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                        num_key_value_heads=3, head_dim=24, max_position_embeddings=2048,
                        tie_word_embeddings=False, rope_theta=10_000.0, dtype="float32", style="v4", shards=3),
    # 24 narrow layers: where a bug confined to one deep layer must be found under bf16 noise (tests).
    "tiny-deep": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                      dtype="float32", style="v5", shards=1),
    # A valid Qwen3 whose MLP width (200) is not a multiple of 16: NVFP4 cannot quantize down_proj (K = 200).
    "tiny-k200": dict(hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                      dtype="float32", style="v5", shards=1),
    # The real Qwen3-4B(-Instruct-2507) shape with random bf16 weights: same cost as the real model.
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     tie_word_embeddings=True, rope_theta=5_000_000.0, dtype="bfloat16", style="v5", shards=4),
    # The Qwen3-32B shape (65.5 GB in bf16): one copy fits an 80 GB GPU, two do not (multi-GPU placement).
    "qwen3-32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      tie_word_embeddings=False, rope_theta=1_000_000.0, dtype="bfloat16", style="v5", shards=17),
    # Qwen3-MoE in miniature (CI): 8 experts, 2 per token, renormalised; layer 0 a dense MLP (mlp_only_layers).
    "tiny-moe": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[0], dtype="float32", style="v5", shards=1),
    # The Qwen3-30B-A3B shape (61 GB in bf16, every expert resident; 3.3B parameters active per token), its
    # config.json spelled as Qwen ships it (transformers 4.x style, num_experts).
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                          tie_word_embeddings=False, rope_theta=1_000_000.0, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          dtype="bfloat16", style="v4", shards=16),
    # Trained, not drawn: `qwenlab tiny DIR --preset trained-24l --train-steps N` (qwenlab.model.training) gives
    # logits with real near-ties; 24 layers, tied, bf16 as real Qwen3 checkpoints are.
    "trained-24l": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
                        dtype="bfloat16", style="v5", shards=1, trained=True),
}
# sha256 of model.safetensors written by `qwenlab tiny` for the deterministic presets.
CHECKSUMS_FILE = DATA_DIR / "tiny_checksums.json"
STOP_TOKEN_ROWS = (151643, 151645)


def config_json(preset: str, **overrides) -> dict:
    """config.json of a preset; overrides replace preset fields (a smaller variant of a shape, for tests)."""
    p = {**BASE, **PRESETS[preset], **overrides}
    raw = {k: v for k, v in p.items() if k not in ("style", "shards", "dtype", "rope_theta", "trained")}
    moe = "num_experts" in p
    raw |= {"architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
            "model_type": "qwen3_moe" if moe else "qwen3", "max_window_layers": p["num_hidden_layers"],
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}
    if moe:
        raw |= {"output_router_logits": False, "router_aux_loss_coef": 0.001}
    if p["style"] == "v4":
        raw |= {"rope_theta": p["rope_theta"], "rope_scaling": None, "torch_dtype": p["dtype"],
                "transformers_version": "4.51.0"}
    else:
        raw |= {"rope_parameters": {"rope_type": "default", "rope_theta": p["rope_theta"]}, "dtype": p["dtype"],
                "transformers_version": "5.0.0"}
    return raw


def _numpy_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Scaled init: 1/sqrt(fan_in) projections, residual writers shrunk with depth, norms near (not at) one,
    embeddings wide enough that greedy decoding has clear winners, the stop tokens slightly favoured."""
    rng = np.random.default_rng(seed)
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    Dh, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    def norm_weight(n, spread):
        return (np.float32(1.0) + normal((n,), spread)).astype(np.float32)

    embed = normal((V, H), 0.5)
    embed[list(STOP_TOKEN_ROWS)] *= np.float32(2.6)
    w = {"model.embed_tokens.weight": embed}
    resid = 1.0
    moe = config_from_dict(cfg) if "num_experts" in cfg else None
    for i in range(L):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": norm_weight(H, 0.1),
            p + "self_attn.q_proj.weight": normal((nq * Dh, H), 1 / np.sqrt(H)),
            p + "self_attn.k_proj.weight": normal((nkv * Dh, H), 1 / np.sqrt(H)),
            p + "self_attn.v_proj.weight": normal((nkv * Dh, H), 1 / np.sqrt(H)),
            p + "self_attn.o_proj.weight": normal((H, nq * Dh), resid / np.sqrt(nq * Dh)),
            p + "self_attn.q_norm.weight": norm_weight(Dh, 0.3),
            p + "self_attn.k_norm.weight": norm_weight(Dh, 0.3),
            p + "post_attention_layernorm.weight": norm_weight(H, 0.1),
        }
        if moe is not None and is_moe_layer(moe, i):
            I_e = moe.moe_intermediate_size
            w[p + "mlp.gate.weight"] = normal((moe.num_experts, H), 1 / np.sqrt(H))
            for e in range(moe.num_experts):
                w |= {f"{p}mlp.experts.{e}.gate_proj.weight": normal((I_e, H), 1 / np.sqrt(H)),
                      f"{p}mlp.experts.{e}.up_proj.weight": normal((I_e, H), 1 / np.sqrt(H)),
                      f"{p}mlp.experts.{e}.down_proj.weight": normal((H, I_e), resid / np.sqrt(I_e))}
        else:
            w |= {p + "mlp.gate_proj.weight": normal((I, H), 1 / np.sqrt(H)),
                  p + "mlp.up_proj.weight": normal((I, H), 1 / np.sqrt(H)),
                  p + "mlp.down_proj.weight": normal((H, I), resid / np.sqrt(I))}
    w["model.norm.weight"] = (4 * norm_weight(H, 0.1)).astype(np.float32)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal((V, H), 0.5)
    return w


def _torch_tensor(cfg: dict, name: str, shape: tuple, index: int, seed: int, dtype: torch.dtype,
                  device) -> torch.Tensor:
    """The same recipe with torch's generator, one seed per tensor (so shards can be made one at a time, on a GPU
    for the large shapes): fast, not byte-stable across torch versions."""
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + index)
    if len(shape) == 1:
        t = 1 + 0.1 * torch.randn(shape, generator=gen, device=device)
    else:
        std = 0.5 if "embed" in name or "lm_head" in name else 1 / np.sqrt(shape[1])
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std /= np.sqrt(2 * cfg["num_hidden_layers"])
        t = torch.randn(shape, generator=gen, device=device) * std
    return t.to(dtype).cpu()


def _shards(cfg: dict, preset: str, seed: int, device) -> list:
    """The checkpoint's shards as functions that make their tensors, so a large one never sits in memory whole."""
    n, dtype = PRESETS[preset]["shards"], PRESETS[preset]["dtype"]
    if dtype == "float32":
        weights = {k: torch.from_numpy(v) for k, v in _numpy_weights(cfg, seed).items()}
        names = list(weights)
        return [lambda part=names[i::n]: {k: weights[k] for k in part} for i in range(n)]
    shapes = hf_shapes(config_from_dict(cfg))
    order = {name: i for i, name in enumerate(shapes)}
    names = list(shapes)
    return [lambda part=names[i::n]: {k: _torch_tensor(cfg, k, shapes[k], order[k], seed, getattr(torch, dtype), device)
                                      for k in part} for i in range(n)]


def write_checkpoint(out_dir, preset: str = "tiny", seed: int = 0, device: str = "cpu") -> Path:
    """Writes into a temp folder then renames, so a failed run never leaves a half-written checkpoint. `device`
    draws the random weights of the bf16 presets there (a GPU makes the 32B shape in seconds, not minutes)."""
    check_preset(preset)
    if PRESETS[preset].get("trained"):
        raise QwenlabError(f"--preset {preset}: a trained preset; add --train-steps N (or --train-seconds S)")
    out_dir = check_empty(out_dir)
    cfg = config_json(preset)
    need = sum(math.prod(shape) for shape in hf_shapes(config_from_dict(cfg)).values()) * \
        getattr(torch, PRESETS[preset]["dtype"]).itemsize  # a tied head's table counted twice: an upper bound
    with room_for(out_dir, need), atomic_dir(out_dir) as tmp:
        write_files(tmp, cfg, _shards(cfg, preset, seed, device))
        umask_modes(tmp)
    return out_dir


def umask_modes(folder: Path):
    """safetensors writes its files 0600: give every file the mode a plain open() would (0644 under umask 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~mask)


def check_preset(preset: str):
    if preset not in PRESETS:
        raise QwenlabError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")


def check_empty(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise QwenlabError(f"{out_dir}: exists and is not empty (refusing to overwrite)")
    return out_dir


def write_files(d: Path, cfg: dict, shards: list):
    """config.json, generation_config.json, the weights (`shards`: functions returning name -> tensor, one file
    each) and the real Qwen3 tokenizer files, into folder `d`."""
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
           "do_sample": False, "transformers_version": cfg.get("transformers_version")}
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    if len(shards) == 1:
        save_file(shards[0](), str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, make in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = make()
            save_file(part, str(d / fname), metadata={"format": "pt"})
            weight_map |= {k: fname for k in part}
            total += sum(t.numel() * t.element_size() for t in part.values())
            del part
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    src = qwen3_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, d / name)


def checkpoint_digest(checkpoint_dir) -> str:
    """sha256 over every file of the checkpoint (names and bytes, sorted): one number for 'same bytes'."""
    h = hashlib.sha256()
    for path in sorted(Path(checkpoint_dir).iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def expected_digest(preset: str) -> str | None:
    if not CHECKSUMS_FILE.is_file():
        return None
    return json.loads(CHECKSUMS_FILE.read_text()).get(preset)


def verify(checkpoint_dir, preset: str) -> str:
    digest = checkpoint_digest(checkpoint_dir)
    want = expected_digest(preset)
    if want is not None and digest != want:
        raise QwenlabError(f"{checkpoint_dir}: checksum {digest[:16]} != committed {want[:16]} for preset "
                           f"{preset!r} (data/tiny_checksums.json): the fixture is not byte-identical")
    return digest


DEFAULT_TINY = DATA_DIR / "models" / "tiny-qwen3"


def ensure_tiny(path=None, preset: str = "tiny") -> Path:
    """The embedded default model, generated on first use. Several processes may do that at once (the first run of
    a test suite, two reports): each writes its own temp folder, the first rename wins and the others' copies,
    byte-identical, are dropped."""
    path = Path(path) if path else DEFAULT_TINY
    if not (path / "config.json").is_file():
        try:
            write_checkpoint(path, preset)
        except (OSError, QwenlabError):
            if not (path / "config.json").is_file():  # not another process's finished copy: a real failure
                raise
        verify(path, preset)
    return path


def resolve_model_dir(model_dir=None) -> Path:
    """The user's checkpoint directory, or the embedded default (generated on first use) when none is given."""
    return Path(model_dir) if model_dir else ensure_tiny()
