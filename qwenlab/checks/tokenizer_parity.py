"""Tokenizer parity (notebook 01): qwenlab's Tokenizer vs transformers' AutoTokenizer vs tiktoken over qwen.tiktoken,
chat-template rendering vs apply_chat_template, and what a byte-level fallback tokenizer would have produced."""
from __future__ import annotations

import base64
import json
import os
import unicodedata
from pathlib import Path

import pandas as pd
import torch

from qwenlab.activations.reference import quiet_optional_imports
from qwenlab.checks.nbutil import check_max, check_min
from qwenlab.errors import QwenlabError
from qwenlab.model.tokenizer import byte_level_char_to_byte
from qwenlab.model.tokenizer_files import qwen_tiktoken_path
from qwenlab.paths import DATA_DIR

CORPUS_PATH = DATA_DIR / "tokenizer_corpus.jsonl"
REFERENCE = "transformers"
UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def load_corpus(path=None) -> list[dict]:
    lines = Path(path or CORPUS_PATH).read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines if line.strip()]


def read_tokenizer_json(tokenizer_dir) -> dict:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise QwenlabError(f"{path}: not found (tiktoken parity needs the checkpoint's tokenizer.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def _walk(node, kind: str | None):
    """Every component (of the given type, or all) of a possibly Sequence-nested normalizer or pre_tokenizer."""
    if not isinstance(node, dict):
        return
    if kind is None or node.get("type") == kind:
        yield node
    for child in node.get("pretokenizers", []) + node.get("normalizers", []):
        yield from _walk(child, kind)


def pretokenizer_regex(tokenizer_json: dict) -> str:
    """The Split regex of tokenizer.json's pre_tokenizer: the pattern tiktoken must split words with."""
    for split in _walk(tokenizer_json.get("pre_tokenizer"), "Split"):
        pattern = split.get("pattern", {})
        if "Regex" in pattern:
            return pattern["Regex"]
    raise QwenlabError("tokenizer.json has no Split pre-tokenizer with a regex: cannot build a tiktoken encoding")


def normalization_forms(tokenizer_json: dict) -> list[str]:
    """Unicode normalizations tokenizer.json applies before BPE (Qwen3: ['NFC']); tiktoken applies none."""
    return [n["type"] for n in _walk(tokenizer_json.get("normalizer"), None) if n.get("type") in UNICODE_FORMS]


def normalize(text: str, forms: list[str]) -> str:
    for form in forms:
        text = unicodedata.normalize(form, text)
    return text


def added_tokens(tokenizer_json: dict) -> dict[str, int]:
    return {token["content"]: token["id"] for token in tokenizer_json.get("added_tokens", [])}


def load_tiktoken_ranks(path=None) -> dict[bytes, int]:
    ranks = {}
    for line in Path(path or qwen_tiktoken_path()).read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class TiktokenQwen:
    """tiktoken over qwen.tiktoken with tokenizer.json's split regex and added tokens; NFC applied first."""

    def __init__(self, tokenizer_dir, tiktoken_path=None):
        import tiktoken

        spec = read_tokenizer_json(tokenizer_dir)
        self.pattern = pretokenizer_regex(spec)
        self.forms = normalization_forms(spec)
        self.special_tokens = added_tokens(spec)
        self.encoding = tiktoken.Encoding("qwen-tiktoken", pat_str=self.pattern,
                                          mergeable_ranks=load_tiktoken_ranks(tiktoken_path),
                                          special_tokens=self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(normalize(text, self.forms), allowed_special="all")

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))


def hf_tokenizer(tokenizer_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    quiet_optional_imports()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def encoders(ours, hf, tik) -> dict:
    """name -> text -> ids; the first is the reference every other one is compared with."""
    return {REFERENCE: lambda text: hf.encode(text, add_special_tokens=False),
            "qwenlab": ours.encode, "tiktoken": tik.encode}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def corpus_parity(corpus: list[dict], encode: dict) -> pd.DataFrame:
    """One row per (text, implementation): ids, whether they equal the reference's, where they first differ."""
    ref_name, rows = next(iter(encode)), []
    for item in corpus:
        expected = encode[ref_name](item["text"])
        for name, fn in encode.items():
            if name == ref_name:
                continue
            ids = fn(item["text"])
            at = first_difference(ids, expected)
            rows.append({"id": item["id"], "category": item["category"], "impl": name,
                         "chars": len(item["text"]), "ref_tokens": len(expected), "tokens": len(ids),
                         "match": at is None, "first_diff": at, "ids": ids, "ref_ids": expected})
    return pd.DataFrame(rows)


def mismatch_table(parity: pd.DataFrame, corpus: list[dict] | None = None, context: int = 4) -> pd.DataFrame:
    """The rows that disagree with the reference (empty when all agree), ids shown around the first difference."""
    bad = parity[~parity["match"]].copy()
    texts = {item["id"]: item["text"] for item in corpus or []}
    columns = ["id", "category", "impl", "text", "first_diff", "ref_tokens", "tokens", "ref_ids_near", "ids_near"]
    if bad.empty:
        return pd.DataFrame(columns=columns)
    bad["first_diff"] = bad["first_diff"].astype(int)
    lo = [max(at - context, 0) for at in bad["first_diff"]]
    bad["ref_ids_near"] = [r[s:s + 2 * context] for r, s in zip(bad["ref_ids"], lo)]
    bad["ids_near"] = [r[s:s + 2 * context] for r, s in zip(bad["ids"], lo)]
    bad["text"] = [texts.get(i, "")[:60] for i in bad["id"]]
    return bad[columns].reset_index(drop=True)


def per_category(parity: pd.DataFrame) -> pd.DataFrame:
    """texts, tokens and mismatches per implementation, one row per corpus category."""
    frame = parity.assign(mismatch=~parity["match"]).pivot_table(
        index="category", columns="impl", values="mismatch", aggfunc="sum")
    frame.columns = [f"{c} mismatches" for c in frame.columns]
    first = parity[parity["impl"] == parity["impl"].iloc[0]].groupby("category")
    frame.insert(0, "texts", first.size())
    frame.insert(1, "ref_tokens", first["ref_tokens"].sum())
    return frame.astype(int)


def mismatch_counts(parity: pd.DataFrame) -> dict[str, int]:
    return {impl: int((~group["match"]).sum()) for impl, group in parity.groupby("impl")}


def template_conversations() -> dict[str, list[dict]]:
    return {
        "single_turn": [{"role": "user", "content": "What is the capital of France?"}],
        "system_single_turn": [{"role": "system", "content": "You are terse."},
                               {"role": "user", "content": "2+2? 答えて 🙂"}],
        "multi_turn": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "请用一句话介绍你自己。"},
        ],
        "multi_turn_thinking_history": [
            {"role": "user", "content": "What is 3*7?"},
            {"role": "assistant", "content": "<think>\n3*7 is 21.\n</think>\n\n21"},
            {"role": "user", "content": "And 3*8?"},
            {"role": "assistant", "content": "<think>\nAdd 3.\n</think>\n\n24"},
            {"role": "user", "content": "Thanks!\r\nBye."},
        ],
    }


def _ids(result) -> list[int]:
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def template_parity(ours, hf, conversations: dict | None = None) -> pd.DataFrame:
    """Every conversation x enable_thinking (None/True/False) x add_generation_prompt: rendered text and ids."""
    rows = []
    for name, messages in (conversations or template_conversations()).items():
        for thinking in (None, True, False):
            for gen_prompt in (True, False):
                extra = {} if thinking is None else {"enable_thinking": thinking}
                want_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt, **extra)
                want_ids = _ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt,
                                                       **extra))
                text = ours.render_chat(messages, gen_prompt, thinking)
                ids = ours.encode_chat(messages, gen_prompt, thinking)
                rows.append({"conversation": name, "user_turns": sum(m["role"] == "user" for m in messages),
                             "enable_thinking": str(thinking), "generation_prompt": gen_prompt,
                             "tokens": len(want_ids), "text_match": text == want_text, "ids_match": ids == want_ids,
                             "first_diff": first_difference(ids, want_ids)})
    frame = pd.DataFrame(rows)
    frame["match"] = frame["text_match"] & frame["ids_match"]
    return frame


def byte_fallback_ids(text: str, tokenizer=None, scheme: str = "vocab") -> list[int]:
    """One id per UTF-8 byte. 'vocab': the vocabulary's single-byte token for each byte (the best a byte fallback
    can do); 'raw': the byte value itself used as an id (a hand-rolled fallback that never read the vocabulary)."""
    data = text.encode("utf-8")
    if scheme == "raw":
        return list(data)
    if scheme != "vocab":
        raise QwenlabError(f"byte fallback scheme {scheme!r}: choose 'vocab' or 'raw'")
    byte_to_char = {b: c for c, b in byte_level_char_to_byte().items()}
    return [tokenizer.token_to_id(byte_to_char[b]) for b in data]


def _next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor(ids, device=model.device), last_only=True)
    return torch.log_softmax(logits[0, -1].double().cpu(), -1)


def fallback_comparison(model, tokenizer, text: str) -> pd.DataFrame:
    """tokenizer.json ids vs both byte fallbacks for one prompt: counts, coinciding ids, the model's next token."""
    real = tokenizer.encode(text)
    variants = {"tokenizer.json": real,
                "byte fallback (vocab byte tokens)": byte_fallback_ids(text, tokenizer, "vocab"),
                "byte fallback (raw byte values)": byte_fallback_ids(text, tokenizer, "raw")}
    ref_lp = _next_token_logprobs(model, real)
    ref_top = int(ref_lp.argmax())
    rows = []
    for name, ids in variants.items():
        lp = ref_lp if ids is real else _next_token_logprobs(model, ids)
        top = int(lp.argmax())
        same = sum(a == b for a, b in zip(ids, real))
        rows.append({"encoding": name, "tokens": len(ids), "token_ratio": len(ids) / max(len(real), 1),
                     "same_id_same_position_pct": 100.0 * same / max(len(ids), 1),
                     "shared_ids_pct": 100.0 * len(set(ids) & set(real)) / max(len(set(ids)), 1),
                     "next_token": top, "next_token_text": tokenizer.decode([top]),
                     "next_token_matches": top == ref_top,
                     "next_token_kl": float((ref_lp.exp() * (ref_lp - lp)).sum().clamp_min(0))})
    return pd.DataFrame(rows).set_index("encoding")


def ids_side_by_side(tokenizer, text: str, n: int = 16) -> pd.DataFrame:
    """The first n positions of the real ids next to the byte fallback's, with the tokens they stand for."""
    real = tokenizer.encode(text)
    fallback = byte_fallback_ids(text, tokenizer, "vocab")
    raw = byte_fallback_ids(text, tokenizer, "raw")
    rows = []
    for i in range(min(n, max(len(real), len(fallback)))):
        def at(ids):
            return (ids[i], tokenizer.id_to_token(ids[i])) if i < len(ids) else (None, "")
        (r, rt), (f, ft), (w, wt) = at(real), at(fallback), at(raw)
        rows.append({"position": i, "real_id": r, "real_token": rt, "fallback_id": f, "fallback_token": ft,
                     "raw_byte_id": w, "raw_byte_as_token": wt})
    return pd.DataFrame(rows).set_index("position")


def fallback_inflation(corpus: list[dict], tokenizer) -> pd.DataFrame:
    """Per corpus category: UTF-8 bytes (= byte-fallback tokens) per tokenizer.json token."""
    rows = [{"category": item["category"], "bytes": len(item["text"].encode("utf-8")),
             "tokens": len(tokenizer.encode(item["text"]))} for item in corpus]
    frame = pd.DataFrame(rows).groupby("category")[["bytes", "tokens"]].sum()
    frame["fallback_ratio"] = frame["bytes"] / frame["tokens"].clip(lower=1)
    return frame.sort_values("fallback_ratio", ascending=False)


def fallback_metrics(fallback: pd.DataFrame, inflation: pd.DataFrame) -> dict:
    """The byte-fallback numbers of the verdict: recorded, not judged."""
    vocab_fb = fallback.loc["byte fallback (vocab byte tokens)"]
    raw_fb = fallback.loc["byte fallback (raw byte values)"]
    return {
        "fallback_prompt_tokens": int(fallback.loc["tokenizer.json", "tokens"]),
        "fallback_tokens": int(vocab_fb["tokens"]),
        "fallback_ratio": float(vocab_fb["token_ratio"]),
        "fallback_same_position_pct": float(vocab_fb["same_id_same_position_pct"]),
        "fallback_next_token_matches": bool(vocab_fb["next_token_matches"]),
        "fallback_next_token_kl": float(vocab_fb["next_token_kl"]),
        "raw_fallback_same_position_pct": float(raw_fb["same_id_same_position_pct"]),
        "raw_fallback_next_token_matches": bool(raw_fb["next_token_matches"]),
        "raw_fallback_next_token_kl": float(raw_fb["next_token_kl"]),
        "corpus_fallback_ratio": float(inflation["bytes"].sum() / inflation["tokens"].sum()),
    }


def verdict(thresholds: dict, *, corpus: list[dict], mismatches: dict[str, int], categories: pd.DataFrame,
            templates: pd.DataFrame, fallback: pd.DataFrame, inflation: pd.DataFrame) -> tuple[dict, list[str]]:
    """Notebook 01's metrics and the thresholds they exceed (an empty list passes)."""
    metrics = {
        "corpus_size": len(corpus),
        "corpus_tokens": int(categories["ref_tokens"].sum()),
        "mismatches_qwenlab": mismatches.get("qwenlab", 0),
        "mismatches_tiktoken": mismatches.get("tiktoken", 0),
        "template_cases": len(templates),
        "template_mismatches": int((~templates["match"]).sum()),
        "per_category": categories.to_dict(orient="index"),
        **fallback_metrics(fallback, inflation),
    }
    reasons: list[str] = []
    check_max(reasons, "qwenlab encode mismatches", metrics["mismatches_qwenlab"], thresholds["max_mismatches_qwenlab"])
    check_max(reasons, "tiktoken encode mismatches", metrics["mismatches_tiktoken"],
              thresholds["max_mismatches_tiktoken"])
    check_max(reasons, "chat template mismatches", metrics["template_mismatches"],
              thresholds["max_template_mismatches"])
    check_min(reasons, "corpus size", metrics["corpus_size"], thresholds["min_corpus_size"])
    return metrics, reasons
