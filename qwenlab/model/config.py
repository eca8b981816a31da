"""Qwen3 config.json in both spellings seen in the wild (transformers 4.x and 5.x)."""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from qwenlab.errors import QwenlabError

QWEN3_ARCHITECTURES = {"Qwen3ForCausalLM"}


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def config_hash(self) -> str:
        """Identity of the architecture: two checkpoints with the same hash have the same shapes and math."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _rope_theta(raw: dict, where: str) -> float:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise QwenlabError(f"{where}: rope_type {rope_type!r} is not supported (only default RoPE)")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise QwenlabError(f"{where}: no rope_theta (neither top-level nor in rope_parameters)")
    return float(theta)


def _require(raw: dict, key: str, where: str):
    if key not in raw:
        raise QwenlabError(f"{where}: missing required key {key!r}")
    return raw[key]


def config_from_dict(raw: dict, where: str = "config.json") -> Qwen3Config:
    model_type = raw.get("model_type")
    archs = set(raw.get("architectures") or [])
    if model_type != "qwen3" or (archs and not archs & QWEN3_ARCHITECTURES):
        raise QwenlabError(
            f"{where}: model_type={model_type!r} architectures={sorted(archs)} is not Qwen3 "
            "(qwenlab supports model_type 'qwen3' / Qwen3ForCausalLM only)"
        )
    if raw.get("use_sliding_window"):
        raise QwenlabError(f"{where}: use_sliding_window=true is not supported")
    heads = int(_require(raw, "num_attention_heads", where))
    hidden = int(_require(raw, "hidden_size", where))
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise QwenlabError(f"{where}: hidden_act {act!r} is not supported (Qwen3 uses silu)")
    return Qwen3Config(
        vocab_size=int(_require(raw, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", where)),
        num_hidden_layers=int(_require(raw, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        max_position_embeddings=int(_require(raw, "max_position_embeddings", where)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw, where),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        hidden_act=act,
        torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
    )


def read_config(checkpoint_dir: Path) -> Qwen3Config:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise QwenlabError(f"{path}: not found (is {checkpoint_dir} a Hugging Face checkpoint directory?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenlabError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(raw, str(path))


def read_generation_config(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QwenlabError(f"{path}: not valid JSON ({e})") from None
