"""A short deterministic language-model run of qwenlab's own Qwen3 forward: seeded init and data order, AdamW
with linear warmup and cosine decay, float32 master weights, bf16 autocast on CUDA."""
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qwenlab.errors import QwenlabError
from qwenlab.model.config import Qwen3Config
from qwenlab.model.qwen3 import Qwen3


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_steps: int = 30  # fixed, so a --train-seconds run's first steps equal a --train-steps run's
    weight_decay: float = 0.1  # on matrices only
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    init_std: float = 0.02  # embeddings (tied: also the head)

    def to_json(self) -> dict:
        return asdict(self)


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def init_weights(model: Qwen3, seed: int, embed_std: float = 0.02):
    """One generator per tensor, seeded by its position (as tiny.py draws its bf16 presets): projections
    N(0, 1/fan_in), the residual writers (o_proj, down_proj) shrunk by 1/sqrt(2 layers), embeddings N(0, embed_std),
    norms one. Unlike the random fixtures (wide embeddings, for clear winners) this is a scale that trains."""
    layers = model.config.num_hidden_layers
    for index, (name, p) in enumerate(model.named_parameters()):
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        gen = torch.Generator("cpu").manual_seed(seed * 1_000_003 + index)
        std = embed_std if "embed" in name or "lm_head" in name else 1 / math.sqrt(p.shape[1])
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std /= math.sqrt(2 * layers)
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_model(cfg: Qwen3Config, seed: int, device: torch.device, embed_std: float = 0.02) -> Qwen3:
    """Float32 master weights on `device`, the head tied to the embedding when the config says so."""
    model = Qwen3(cfg).float()  # on the CPU: the RoPE table is computed there, exactly as the reference does
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    init_weights(model, seed, embed_std)
    return model.to(device)


def batches(ids: torch.Tensor, s: TrainSettings, steps: int):
    """Yields (step, [B, T+1] windows): the stream cut into non-overlapping windows, shuffled by a seeded
    generator each epoch, taken in order."""
    n = (len(ids) - 1) // s.seq_len
    if n < s.batch_size:
        raise QwenlabError(f"training text too short: {len(ids)} tokens make {n} windows of {s.seq_len}, "
                           f"fewer than one batch of {s.batch_size}")
    gen = torch.Generator("cpu").manual_seed(s.seed)
    order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + s.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        starts = order[pos:pos + s.batch_size] * s.seq_len
        pos += s.batch_size
        yield step, torch.stack([ids[i:i + s.seq_len + 1] for i in starts.tolist()])


def check_budget(steps: int | None, seconds: float | None):
    if (steps is None) == (seconds is None):
        raise QwenlabError("give exactly one of --train-steps and --train-seconds")
    if steps is not None and steps < 1:
        raise QwenlabError(f"--train-steps {steps}: must be at least 1")
    if seconds is not None and not seconds > 0:
        raise QwenlabError(f"--train-seconds {seconds}: must be positive")


@dataclass
class TrainResult:
    steps: int
    losses: list
    seconds: float
    tokens_seen: int
    seconds_budget: float | None = None  # the --train-seconds that fixed `steps`, if any


def optimizer(model: Qwen3, s: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=s.lr, betas=s.betas, eps=1e-8, fused=model.device.type == "cuda")


def train_step(model: Qwen3, opt: torch.optim.Optimizer, window: torch.Tensor, lr: float, grad_clip: float) -> float:
    """One AdamW step on the next-token loss of [B, T+1] ids (bf16 autocast on CUDA); returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
        logits = model(window[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@contextmanager
def deterministic(device: torch.device):
    """Deterministic kernels while training (e.g. the embedding's backward without atomics on CUDA), warn-only."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: the first matmul
    was, was_filling = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a debugging aid, not needed for determinism
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def train(model: Qwen3, ids: torch.Tensor, s: TrainSettings, steps: int | None = None,
          seconds: float | None = None, calibrate_steps: int = 8, log=sys.stderr) -> TrainResult:
    """Trains `model` in place for `steps`, or for as many steps as fit `seconds` (timed over the first
    `calibrate_steps` steps, all inside the warmup, whose learning rates do not depend on the total; the run is
    then the same as --train-steps with the number found). Progress goes to `log` (None: silent)."""
    def say(message):
        if log is not None:
            print(message, file=log, flush=True)

    check_budget(steps, seconds)
    torch.manual_seed(s.seed)
    opt = optimizer(model, s)
    total = steps if steps is not None else 10 ** 9
    calibrate_steps = max(2, min(calibrate_steps, s.warmup_steps))
    losses = []
    model.train()
    start = time.perf_counter()
    try:
        with deterministic(model.device):
            for step, window in batches(ids.to(model.device), s, total):
                if step >= total:
                    break
                losses.append(train_step(model, opt, window, lr_at(step, total, s), s.grad_clip))
                if step == 0:
                    t_first = time.perf_counter()
                if seconds is not None and step + 1 == calibrate_steps:
                    per_step = (time.perf_counter() - t_first) / (calibrate_steps - 1)
                    left = seconds - (time.perf_counter() - start)
                    total = calibrate_steps + max(0, int(left / per_step))
                    say(f"[train] {per_step * 1e3:.0f} ms/step: {total} steps fit {seconds:g} s")
                if (step + 1) % max(1, total // 10) == 0 or step + 1 == total:
                    say(f"[train] step {step + 1}/{total} loss {losses[-1]:.3f} lr {lr_at(step, total, s):.2e} "
                        f"({time.perf_counter() - start:.1f} s)")
    finally:
        model.eval()
    elapsed = time.perf_counter() - start
    return TrainResult(len(losses), losses, elapsed, len(losses) * s.batch_size * s.seq_len, seconds)
