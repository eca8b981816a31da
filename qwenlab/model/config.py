"""Qwen3 and Qwen3-MoE config.json in both spellings seen in the wild (transformers 4.x and 5.x)."""
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from qwenlab.errors import QwenlabError

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}  # model_type -> architecture
REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
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


def json_type(value) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _object(value, key: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise QwenlabError(f"{where}: {key} must be a JSON object or null, got {value!r}")
    return value


def is_moe_layer(cfg: Qwen3Config, layer: int) -> bool:
    """transformers' rule (Qwen3MoeDecoderLayer): a sparse MoE block unless the layer is in mlp_only_layers or
    off the decoder_sparse_step grid; a dense MLP otherwise."""
    return _sparse(layer, cfg.num_experts, cfg.mlp_only_layers, cfg.decoder_sparse_step)


def _sparse(layer: int, experts: int, mlp_only_layers, step: int) -> bool:
    return experts > 0 and layer not in mlp_only_layers and (layer + 1) % step == 0


def _rope_theta(raw: dict, where: str):
    params = _object(raw.get("rope_parameters"), "rope_parameters", where)
    scaling = _object(raw.get("rope_scaling"), "rope_scaling", where)
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise QwenlabError(f"{where}: rope_type {rope_type!r} is not supported (only default RoPE)")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise QwenlabError(f"{where}: no rope_theta (neither top-level nor in rope_parameters)")
    return theta


def _require(raw: dict, key: str, where: str):
    if key not in raw:
        raise QwenlabError(f"{where}: missing required key {key!r}")
    return raw[key]


def _int(value, key: str, where: str) -> int:
    """A JSON integer >= 1 (not a bool, not 4.0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QwenlabError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def _positive(value, key: str, where: str) -> float:
    """A finite number > 0 (JSON integer or float, not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QwenlabError(f"{where}: {key} must be a finite number > 0, got {value!r}")
    return float(value)


def _flag(raw: dict, key: str, where: str) -> bool:
    value = raw.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise QwenlabError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _text(raw: dict, keys: tuple, default: str, where: str) -> str:
    key = next((k for k in keys if raw.get(k)), None)
    if key is None:
        return default
    if not isinstance(raw[key], str):
        raise QwenlabError(f"{where}: {key} must be a string, got {raw[key]!r}")
    return raw[key]


def _check_heads(heads: int, kv_heads: int, head_dim: int, where: str):
    if heads % kv_heads:
        raise QwenlabError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if head_dim % 2:
        raise QwenlabError(f"{where}: head_dim={head_dim} is odd (rotary embeddings rotate pairs of dimensions)")


def config_from_dict(raw: dict, where: str = "config.json") -> Qwen3Config:
    if not isinstance(raw, dict):
        raise QwenlabError(f"{where}: the JSON root is {json_type(raw)}, not an object")
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise QwenlabError(f"{where}: architectures must be a list of strings, got {archs!r}")
    if model_type not in ARCHITECTURES or (archs and ARCHITECTURES[model_type] not in archs):
        raise QwenlabError(
            f"{where}: model_type={model_type!r} architectures={sorted(archs)} is not Qwen3 "
            "(qwenlab supports model_type 'qwen3' / Qwen3ForCausalLM and 'qwen3_moe' / Qwen3MoeForCausalLM)"
        )
    if _flag(raw, "use_sliding_window", where):
        raise QwenlabError(f"{where}: use_sliding_window=true is not supported")
    act = _text(raw, ("hidden_act",), "silu", where)
    if act != "silu":
        raise QwenlabError(f"{where}: hidden_act {act!r} is not supported (Qwen3 uses silu)")
    sizes = {key: _int(_require(raw, key, where), key, where) for key in REQUIRED_INTS}
    heads, hidden, layers = sizes["num_attention_heads"], sizes["hidden_size"], sizes["num_hidden_layers"]
    kv_heads = heads if raw.get("num_key_value_heads") is None else _int(raw["num_key_value_heads"],
                                                                         "num_key_value_heads", where)
    if raw.get("head_dim") is not None:
        head_dim = _int(raw["head_dim"], "head_dim", where)
    else:
        head_dim = _int(hidden // heads, "head_dim (hidden_size // num_attention_heads, no head_dim given)", where)
    _check_heads(heads, kv_heads, head_dim, where)
    moe = moe_fields(raw, layers, where) if model_type == "qwen3_moe" else {}
    dense_layers = not moe or any(not _sparse(i, moe["num_experts"], moe["mlp_only_layers"],
                                              moe["decoder_sparse_step"]) for i in range(layers))
    if dense_layers or raw.get("intermediate_size") is not None:  # an all-MoE model needs no dense MLP width
        intermediate = _int(_require(raw, "intermediate_size", where), "intermediate_size", where)
    else:
        intermediate = 0
    eps = raw.get("rms_norm_eps", 1e-6)
    return Qwen3Config(
        **sizes,
        intermediate_size=intermediate,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive(eps, "rms_norm_eps", where),
        rope_theta=_positive(_rope_theta(raw, where), "rope_theta", where),
        tie_word_embeddings=_flag(raw, "tie_word_embeddings", where),
        attention_bias=_flag(raw, "attention_bias", where),
        hidden_act=act,
        torch_dtype=_text(raw, ("dtype", "torch_dtype"), "bfloat16", where),
        **moe,
    )


def read_json_object(path: Path) -> dict:
    """A JSON file whose root is an object, or one line saying why it is not."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QwenlabError(f"{path}: not valid JSON ({reason})") from None
    except OSError as e:
        raise QwenlabError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise QwenlabError(f"{path}: the JSON root is {json_type(raw)}, not an object")
    return raw


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
    return config_from_dict(read_json_object(path), str(path))


def read_generation_config(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / "generation_config.json"
    return read_json_object(path) if path.is_file() else {}
