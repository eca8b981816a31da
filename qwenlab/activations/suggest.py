"""Which canonical name a non-canonical dump name probably meant: HF module paths (`model.layers.0.self_attn.q_proj`),
`self_attn`/`attention` for `attn`, a missing `layers.` prefix, `embed_tokens`/`lm_head`, MoE spellings
(`selected_experts`, `routing_weights`), or a near spelling."""
from __future__ import annotations

import re
from difflib import get_close_matches

from qwenlab.activations.names import split_name

PREFIXES = ("base_model.", "model.", "transformer.", "decoder.")
LAYER_PREFIX = re.compile(r"^(?:layers?|h|blocks?|decoder_layers?)[._](\d+)\.|^(\d+)\.")
PART_ALIASES = {"self_attn": "attn", "self_attention": "attn", "attention": "attn", "feed_forward": "mlp",
                "ffn": "mlp", "act_fn": "act", "activation": "act", "o_proj_input": "context",
                "router": "router_logits", "selected_experts": "router_ids", "topk_ids": "router_ids",
                "expert_ids": "router_ids", "routing_weights": "router_weights", "topk_weights": "router_weights"}
WHOLE_ALIASES = {"embed_tokens": "embed", "embeddings": "embed", "tok_embeddings": "embed", "wte": "embed",
                 "lm_head": "logits", "output": "logits", "final_norm": "norm", "final_layernorm": "norm",
                 "ln_f": "norm"}
CLOSE_CUTOFF = 0.85


def normalise(name: str) -> str:
    """The canonical spelling `name` most likely stands for (unchanged when no rule applies)."""
    text = name.strip().lower().replace("/", ".")
    while text.startswith(PREFIXES):
        text = text[text.index(".") + 1:]
    match = LAYER_PREFIX.match(text)
    if match:
        parts = [PART_ALIASES.get(part, part) for part in text[match.end():].split(".")]
        return f"layers.{match.group(1) or match.group(2)}." + ".".join(parts)
    return WHOLE_ALIASES.get(text, text)


def _same_layer(a: str, b: str) -> bool:
    return split_name(a)[0] == split_name(b)[0]


def suggest(unmatched: list[str], missing: list[str]) -> dict[str, str]:
    """{unmatched candidate name: the missing canonical name it probably is}; each missing name suggested once."""
    free = list(missing)
    out = {}
    for name in unmatched:
        guess = normalise(name)
        if guess not in free:
            close = [m for m in get_close_matches(guess, free, n=3, cutoff=CLOSE_CUTOFF) if _same_layer(m, guess)]
            guess = close[0] if close else None
        if guess is not None:
            out[name] = guess
            free.remove(guess)
    return out
