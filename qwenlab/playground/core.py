"""The playground's logic without widgets: settings, prompt rendering, per-token records, readouts and HTML."""
from __future__ import annotations

import html
import io
import math
from dataclasses import asdict, dataclass

import pandas as pd
import psutil
import torch

from qwenlab.errors import QwenlabError
from qwenlab.generation.decode import Generation, generate
from qwenlab.generation.sampling import SamplingParams

INPUT_MODES = ("prompt", "chat")
DECODE_MODES = ("kv", "replay")
# name -> why it cannot be used (None = available). "none" = the checkpoint as it is (an NVFP4 checkpoint stays
# NVFP4); nvfp4 / nvfp4-w4a4 quantize a bf16/fp32 checkpoint at load (doc/nvfp4.md).
QUANTIZATIONS = {"none": None, "nvfp4": None, "nvfp4-w4a4": None}
TOP_K = 5


@dataclass(frozen=True)
class Settings:
    """Everything one Generate click reads from the widgets (snapshot taken on the kernel's thread)."""
    input_mode: str = "prompt"
    prompt: str = ""
    system: str = ""
    thinking: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    decode_mode: str = "kv"
    quantization: str = "none"

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                              max_new_tokens=self.max_new_tokens)

    def validate(self):
        if not self.prompt.strip():
            raise QwenlabError("the prompt is empty: type something to generate from")
        if self.input_mode not in INPUT_MODES:
            raise QwenlabError(f"input mode {self.input_mode!r}: choose one of {', '.join(INPUT_MODES)}")
        if self.decode_mode not in DECODE_MODES:
            raise QwenlabError(f"decode mode {self.decode_mode!r}: choose one of {', '.join(DECODE_MODES)}")
        if QUANTIZATIONS.get(self.quantization, "unknown") is not None:
            why = QUANTIZATIONS.get(self.quantization, "unknown")
            raise QwenlabError(f"quantization {self.quantization!r}: {why}")
        self.sampling_params()

    def to_json(self) -> dict:
        return asdict(self)


def quant_arg(quantization: str) -> str | None:
    """The dropdown's value as the loader's quant argument."""
    return None if quantization in ("none", "", None) else quantization


def chat_messages(settings: Settings, history: list[dict] = ()) -> list[dict]:
    """The conversation a chat turn renders: system prompt (if any), earlier turns, the new user message."""
    head = [{"role": "system", "content": settings.system}] if settings.system.strip() else []
    earlier = [m for m in history if m["role"] != "system"]
    return head + earlier + [{"role": "user", "content": settings.prompt}]


def prompt_ids(settings: Settings, tokenizer, history: list[dict] = ()) -> list[int]:
    """The ids the decode API gets for these settings: raw text as-is, or the chat template's rendering."""
    if settings.input_mode == "prompt":
        return tokenizer.encode(settings.prompt)
    return tokenizer.encode_chat(chat_messages(settings, history), add_generation_prompt=True,
                                 enable_thinking=settings.thinking)


def direct_generation(model, tokenizer, settings: Settings, history: list[dict] = ()) -> Generation:
    """The decode API's own answer for these settings (what the playground's streamed text must equal)."""
    ids = prompt_ids(settings, tokenizer, history)
    return generate(model, ids, settings.sampling_params(), mode=settings.decode_mode, tokenizer=tokenizer)


def token_label(tokenizer, token_id: int) -> str:
    """A token as readable text: its bytes as UTF-8 (a split character shows as \\x.. escapes), quoted."""
    try:
        return repr(tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace"))
    except QwenlabError:
        return f"<id {token_id}>"


class TokenRecorder:
    """generate()'s on_logits and on_token callbacks: on_logits keeps the log-probabilities each token is chosen
    from, on_token() turns them into a row (chosen token's logprob, top-k alternatives). Whichever engine runs."""

    def __init__(self, k: int = TOP_K):
        self.k = k
        self.rows: list[dict] = []
        self._pending = None

    def on_logits(self, logits: torch.Tensor):
        self._pending = torch.log_softmax(logits.float(), dim=-1)

    def reset(self):
        self.rows, self._pending = [], None

    def on_token(self, token: int):
        if self._pending is None:
            return
        top = self._pending.topk(self.k)
        self.rows.append({"step": len(self.rows), "id": int(token), "logprob": float(self._pending[token]),
                          "top_ids": top.indices.tolist(), "top_logprobs": top.values.tolist()})


def token_frame(rows: list[dict], tokenizer) -> pd.DataFrame:
    """Per-token table: token text, id, logprob and p under the model (temperature 1), the top-k alternatives."""
    columns = ["token", "id", "logprob", "p", "top5", "top5_ids", "top5_probs"]
    if not rows:
        return pd.DataFrame(columns=columns).rename_axis("step")
    records = []
    for row in rows:
        probs = [math.exp(lp) for lp in row["top_logprobs"]]
        alts = ", ".join(f"{token_label(tokenizer, i)} {p:.3f}" for i, p in zip(row["top_ids"], probs))
        records.append({"step": row["step"], "token": token_label(tokenizer, row["id"]), "id": row["id"],
                        "logprob": row["logprob"], "p": math.exp(row["logprob"]), "top5": alts,
                        "top5_ids": row["top_ids"], "top5_probs": probs})
    return pd.DataFrame(records, columns=["step"] + columns).set_index("step")


def token_table_html(frame: pd.DataFrame, max_rows: int = 400) -> str:
    if frame.empty:
        return "<i>no tokens yet</i>"
    shown = frame[["token", "id", "logprob", "p", "top5"]].tail(max_rows)
    note = f"<i>last {max_rows} of {len(frame)} tokens</i>" if len(frame) > max_rows else ""
    table = shown.to_html(float_format=lambda v: f"{v:.4f}", classes="qwenlab-token-table", border=0)
    return f"{note}<div style='max-height:260px;overflow:auto;font-size:12px'>{table}</div>"


def memory_readouts(device) -> dict:
    out = {"rss_bytes": psutil.Process().memory_info().rss}
    if device is not None and torch.device(device).type == "cuda":
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        out["cuda_reserved_bytes"] = torch.cuda.memory_reserved(device)
    return out


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def readout_html(r: dict) -> str:
    if not r:
        return "<span class='qwenlab-readout'>tokens – · tok/s – · elapsed – · stop reason –</span>"
    parts = [f"tokens <b>{r['tokens']}</b>", f"<b>{r['tok_s']:.1f}</b> tok/s", f"elapsed <b>{r['elapsed_s']:.2f} s</b>"]
    if r.get("engine"):
        note = f" <span title='{html.escape(r.get('engine_note') or '')}'>ⓘ</span>" if r.get("engine_note") else ""
        parts.append(f"engine <b class='qwenlab-engine'>{r['engine']}</b>{note}")
    if r.get("prefill_s") is not None:
        parts.append(f"prefill <b>{r['prefill_s'] * 1e3:.0f} ms</b>")
    parts.append(f"stop reason <b class='qwenlab-stop-reason'>{r['stop_reason'] or 'running'}</b>")
    parts.append(f"host RSS <b>{gib(r['rss_bytes'])}</b>")
    if "cuda_allocated_bytes" in r:
        parts.append(f"CUDA allocated <b>{gib(r['cuda_allocated_bytes'])}</b> / reserved "
                     f"<b>{gib(r['cuda_reserved_bytes'])}</b>")
    return "<span class='qwenlab-readout'>" + " · ".join(parts) + "</span>"


def output_html(settings: Settings | None, history: list[dict], text: str) -> str:
    """The prompt (chat: the conversation so far) in grey, then the streamed text in span.qwenlab-stream."""
    box = ("white-space:pre-wrap;overflow-wrap:anywhere;font-family:monospace;font-size:13px;"
           "border:1px solid #ddd;padding:6px;max-height:320px;overflow-y:auto;")
    if settings is None:
        return f"<div style='{box}color:#999'>generated text appears here</div>"
    blocks = []
    if settings.input_mode == "chat":
        for m in list(history) + [{"role": "user", "content": settings.prompt}]:
            blocks.append(f"<div><b>{m['role']}:</b> {html.escape(m['content'])}</div>")
        blocks.append("<div><b>assistant:</b> ")
    else:
        blocks.append(f"<div><span style='color:#888'>{html.escape(settings.prompt)}</span>")
    blocks.append(f"<span class='qwenlab-stream'>{html.escape(text)}</span></div>")
    return f"<div style='{box}'>{''.join(blocks)}</div>"
