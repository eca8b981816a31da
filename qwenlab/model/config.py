"""Qwen3 and Qwen3-MoE config.json in both spellings seen in the wild (transformers 4.x and 5.x)."""
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from qwenlab.errors import QwenlabError

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}  # model_type -> architecture
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
              "mlp_only_layers")


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
    # Qwen3-MoE (model_type qwen3_moe); num_experts 0 is a dense Qwen3. intermediate_size is then the dense layers'.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def architecture(self) -> str:
        return ARCHITECTURES["qwen3_moe" if self.is_moe else "qwen3"]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def config_hash(self) -> str:
        """Identity of the architecture: two checkpoints with the same hash have the same shapes and math."""
        fields = asdict(self)
        if not self.is_moe:  # a dense config hashes as it did before the MoE fields existed
            fields = {k: v for k, v in fields.items() if k not in MOE_FIELDS}
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def is_moe_layer(cfg: Qwen3Config, layer: int) -> bool:
    """transformers' rule (Qwen3MoeDecoderLayer): a sparse MoE block unless the layer is in mlp_only_layers or
    off the decoder_sparse_step grid; a dense MLP otherwise."""
    return _sparse(layer, cfg.num_experts, cfg.mlp_only_layers, cfg.decoder_sparse_step)


def _sparse(layer: int, experts: int, mlp_only_layers, step: int) -> bool:
    return experts > 0 and layer not in mlp_only_layers and (layer + 1) % step == 0


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
    if model_type not in ARCHITECTURES or (archs and ARCHITECTURES[model_type] not in archs):
        raise QwenlabError(
            f"{where}: model_type={model_type!r} architectures={sorted(archs)} is not Qwen3 "
            "(qwenlab supports model_type 'qwen3' / Qwen3ForCausalLM and 'qwen3_moe' / Qwen3MoeForCausalLM)"
        )
    if raw.get("use_sliding_window"):
        raise QwenlabError(f"{where}: use_sliding_window=true is not supported")
    heads = int(_require(raw, "num_attention_heads", where))
    hidden = int(_require(raw, "hidden_size", where))
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise QwenlabError(f"{where}: hidden_act {act!r} is not supported (Qwen3 uses silu)")
    layers = int(_require(raw, "num_hidden_layers", where))
    moe = moe_fields(raw, layers, where) if model_type == "qwen3_moe" else {}
    dense_layers = not moe or any(not _sparse(i, moe["num_experts"], moe["mlp_only_layers"],
                                              moe["decoder_sparse_step"]) for i in range(layers))
    return Qwen3Config(
        vocab_size=int(_require(raw, "vocab_size", where)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", where) if dense_layers else
                              raw.get("intermediate_size") or 0),
        num_hidden_layers=layers,
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
        **moe,
    )


def _count(raw: dict, key: str, where: str, low: int, high: int | None = None, default=None) -> int:
    """An integer config field within [low, high]; `default` when absent (None: required)."""
    value = raw.get(key, default)
    if value is None:
        raise QwenlabError(f"{where}: missing required key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise QwenlabError(f"{where}: {key} must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise QwenlabError(f"{where}: {key} = {value} must be {bound}")
    return value


def moe_fields(raw: dict, num_layers: int, where: str) -> dict:
    """The Qwen3-MoE fields of a qwen3_moe config.json, checked. transformers 5 writes num_experts as
    num_local_experts (an attribute_map alias); Qwen's own configs say num_experts."""
    key = "num_local_experts" if "num_local_experts" in raw and "num_experts" not in raw else "num_experts"
    experts = _count(raw, key, where, 1)
    top_k = _count(raw, "num_experts_per_tok", where, 1, experts)
    norm = raw.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise QwenlabError(f"{where}: norm_topk_prob must be true or false, not {norm!r}")
    only = raw.get("mlp_only_layers")
    only = [] if only is None else only
    if not isinstance(only, list):
        raise QwenlabError(f"{where}: mlp_only_layers must be a list of layer indices, not {only!r}")
    for i in only:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise QwenlabError(f"{where}: mlp_only_layers entry {i!r} is not a layer index 0-{num_layers - 1}")
    return dict(num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=_count(raw, "moe_intermediate_size", where, 1), norm_topk_prob=norm,
                decoder_sparse_step=_count(raw, "decoder_sparse_step", where, 1, default=1),
                mlp_only_layers=tuple(sorted(set(only))))


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
