"""`qwenlab tiny DIR --preset P --train-steps N`: a preset's shape trained on the standard library's source, written
in HF layout with its training record (training.json, which loaders ignore) and the realism of its logits."""
import json
import platform
import sys
import time

import torch

from qwenlab.atomic import atomic_dir, json_safe
from qwenlab.model.config import config_from_dict
from qwenlab.model.dtypes import DTYPES
from qwenlab.model.hf_names import hf_shapes
from qwenlab.model.loader import load_model, resolve_device
from qwenlab.model.tiny import check_empty, check_preset, checkpoint_digest, config_json, write_files
from qwenlab.model.tokenizer import Tokenizer
from qwenlab.model.tokenizer_files import qwen3_tokenizer_dir
from qwenlab.model.training import realism
from qwenlab.model.training.corpus import build_corpus
from qwenlab.model.training.trainer import TrainSettings, build_model, check_budget, train
from qwenlab.versions import package_versions

RECORD_FILE = "training.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def write_trained_checkpoint(out_dir, preset: str = "trained-24l", *, steps: int | None = None,
                             seconds: float | None = None, seed: int = 0, device: str = "cpu",
                             settings: TrainSettings | None = None, overrides: dict | None = None,
                             files: list | None = None, realism_args: dict | None = None, log=sys.stderr) -> dict:
    """Trains the preset's shape (`overrides` replace preset fields: a smaller variant for tests) on `files`
    (default: the stdlib's .py files), writes the checkpoint atomically and returns its training record.
    Realism is measured on the checkpoint as written, loaded by qwenlab's loader (its dtype on CUDA, float32
    on the CPU)."""
    wall = time.perf_counter()
    check_preset(preset)
    check_budget(steps, seconds)
    out_dir = check_empty(out_dir)
    dev = resolve_device(device)
    settings = settings or TrainSettings(seed=seed)
    raw = config_json(preset, **(overrides or {}))
    cfg = config_from_dict(raw)
    tokenizer = Tokenizer.from_dir(qwen3_tokenizer_dir())
    corpus = build_corpus(tokenizer, files)
    print(f"[train] corpus: {corpus.facts['train_files']} files, {corpus.facts['train_tokens']:,} tokens "
          f"(held out: {corpus.facts['heldout_files']} files, {corpus.facts['heldout_tokens']:,} tokens)", file=log)
    model = build_model(cfg, settings.seed, dev, settings.init_std)
    result = train(model, corpus.train, settings, steps, seconds, log=log)
    keep = hf_shapes(cfg)
    stored = DTYPES[cfg.torch_dtype]
    state = {k: v.detach().to("cpu", stored).contiguous() for k, v in model.state_dict().items() if k in keep}
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    with atomic_dir(out_dir) as tmp:
        write_files(tmp, raw, [lambda: state])
        loaded = load_model(tmp, device=str(dev))
        measured = realism.measure(loaded, corpus.heldout, seq_len=settings.seq_len, **(realism_args or {}))
        del loaded
        measured["prompt_text"] = tokenizer.decode(measured["prompt_ids"])
        measured["greedy_text"] = tokenizer.decode(measured["greedy_ids"])
        record = {
            "preset": preset, "overrides": overrides or {}, "steps": result.steps,
            "train_seconds_budget": result.seconds_budget, "tokens_seen": result.tokens_seen,
            "seconds": result.seconds, "wall_seconds": time.perf_counter() - wall, "device": device_name(dev),
            "stored_dtype": cfg.torch_dtype, "first_loss": result.losses[0],
            "final_train_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
            "heldout_loss": measured["heldout_loss"], "settings": settings.to_json(), "corpus": corpus.facts,
            "realism": measured, "loss_curve": result.losses, "versions": package_versions(),
            "reproduce": f"qwenlab tiny DIR --preset {preset} --train-steps {result.steps} --seed {settings.seed}",
        }
        (tmp / RECORD_FILE).write_text(json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
    return record


def summary(record: dict, out_dir) -> str:
    """The loss curve at a few points, the realism numbers and where the checkpoint went, for the terminal."""
    losses = record["loss_curve"]
    marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
    r = record["realism"]
    lines = [
        f"trained {record['steps']} steps, {record['tokens_seen']:,} tokens in {record['seconds']:.1f} s on "
        f"{record['device']}",
        "loss: " + ", ".join(f"step {i + 1} {losses[i]:.3f}" for i in marks)
        + f"; final train {record['final_train_loss']:.3f}, held-out {record['heldout_loss']:.3f}",
        f"realism ({r['dtype']} on {r['device']}): median next-token entropy {r['median_entropy']:.2f} nats on "
        f"{r['heldout_tokens_scored']} held-out tokens; {r['near_tie_steps']}/{r['greedy_steps']} greedy steps "
        f"({r['near_tie_fraction']:.1%}) with a top-2 margin < {r['bar']['margin']} (smallest {r['min_margin']:.3f}): "
        + ("REALISTIC" if r["realistic"] else "NOT realistic: " + "; ".join(r["reasons"])),
        "greedy: " + json.dumps(r["greedy_text"][:400], ensure_ascii=False),
        f"wrote trained {record['preset']} checkpoint to {out_dir} (sha256 {checkpoint_digest(out_dir)}; "
        f"{RECORD_FILE} holds the loss curve and the realism numbers)",
    ]
    return "\n".join(lines)
