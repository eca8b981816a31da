"""Training a checkpoint (qwenlab.model.training) on a small variant of the trained-24l preset: deterministic, loss
goes down, the result loads and matches HF transformers; the realism measures on constructed logits."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qwenlab.activations.reference import load_reference
from qwenlab.cli import main
from qwenlab.model.config import config_from_dict
from qwenlab.model.loader import load
from qwenlab.model.tiny import checkpoint_digest, config_json
from qwenlab.model.training import realism
from qwenlab.model.training.corpus import EXCLUDED_DIRS, stdlib_dir, stdlib_files
from qwenlab.model.training.trained import RECORD_FILE, summary, write_trained_checkpoint
from qwenlab.model.training.trainer import TrainSettings, build_model, lr_at, train

SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, dtype="float32")
SETTINGS = TrainSettings(batch_size=2, seq_len=32, lr=3e-2, warmup_steps=2, seed=0)
STEPS = 6
REALISM = dict(max_windows=2, prompt_tokens=16, new_tokens=16)
# Small modules present in every CPython since 3.8; with fewer than 50 files the last one is held out.
FILES = ("abc.py", "bisect.py", "colorsys.py", "copyreg.py", "fnmatch.py", "genericpath.py", "keyword.py", "heapq.py")


def _files():
    return [stdlib_dir() / name for name in FILES]


def _write(path, seed=0):
    return write_trained_checkpoint(path, "trained-24l", steps=STEPS, settings=TrainSettings(**{
        **SETTINGS.to_json(), "seed": seed}), overrides=SMALL, files=_files(), realism_args=REALISM)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    return [(base / name, _write(base / name)) for name in ("a", "b")]


def _weights_digest(path):
    """Every file but training.json (which holds the run's seconds) hashed."""
    digest_dir = path.parent / (path.name + "-no-record")
    digest_dir.mkdir()
    for f in path.iterdir():
        if f.name != RECORD_FILE:
            (digest_dir / f.name).write_bytes(f.read_bytes())
    return checkpoint_digest(digest_dir)


def test_same_seed_gives_the_same_loss_curve_and_bytes(runs):
    (a, rec_a), (b, rec_b) = runs
    assert len(rec_a["loss_curve"]) == STEPS
    assert rec_a["loss_curve"] == rec_b["loss_curve"]
    assert _weights_digest(a) == _weights_digest(b)
    assert rec_a["realism"]["margins"] == rec_b["realism"]["margins"]


def test_another_seed_gives_another_run():
    cfg = config_from_dict(config_json("trained-24l", **SMALL))
    ids = torch.arange(1000) % 97
    curves = []
    for seed in (0, 1):
        s = TrainSettings(**{**SETTINGS.to_json(), "seed": seed})
        curves.append(train(build_model(cfg, seed, torch.device("cpu")), ids, s, steps=1, log=None).losses)
    assert curves[0] != curves[1]


def test_a_time_budget_is_a_step_count_fixed_early():
    """--train-seconds: the steps that fit are fixed after the warmup's timed steps; the run then equals
    --train-steps with that count (whatever this machine's speed made it)."""
    cfg = config_from_dict(config_json("trained-24l", **SMALL))
    ids = torch.arange(1000) % 97
    timed = train(build_model(cfg, 0, torch.device("cpu")), ids, SETTINGS, seconds=2.0, log=None)
    assert timed.steps >= SETTINGS.warmup_steps and timed.seconds_budget == 2.0
    counted = train(build_model(cfg, 0, torch.device("cpu")), ids, SETTINGS, steps=timed.steps, log=None)
    assert counted.losses == timed.losses


def test_loss_goes_down_and_the_record_says_what_ran(runs):
    (path, rec), _ = runs
    on_disk = json.loads((path / RECORD_FILE).read_text())
    assert on_disk["loss_curve"] == rec["loss_curve"]
    losses = rec["loss_curve"]
    assert losses[0] == pytest.approx(math.log(151936), abs=0.5)  # near-uniform at init
    assert losses[-1] < losses[0] - 2.0
    assert rec["steps"] == STEPS and rec["tokens_seen"] == STEPS * 2 * 32
    assert rec["corpus"]["train_files"] == 7 and rec["corpus"]["heldout_files"] == 1
    assert rec["device"].startswith("cpu") and rec["stored_dtype"] == "float32"
    assert math.isfinite(rec["heldout_loss"]) and rec["heldout_loss"] == rec["realism"]["heldout_loss"]
    r = rec["realism"]
    assert r["greedy_steps"] == len(r["margins"]) == len(r["greedy_ids"]) == 16
    assert r["near_tie_steps"] == sum(m < 0.5 for m in r["margins"])
    assert r["heldout_tokens_scored"] == 2 * 32
    assert r["dtype"] == "float32"
    assert rec["reproduce"] == "qwenlab tiny DIR --preset trained-24l --train-steps 6 --seed 0"


def test_summary_gives_the_curve_and_the_realism_numbers(runs):
    (path, rec), _ = runs
    text = summary(rec, path)
    assert f"step 1 {rec['loss_curve'][0]:.3f}" in text and f"step 6 {rec['loss_curve'][-1]:.3f}" in text
    assert f"held-out {rec['heldout_loss']:.3f}" in text
    assert f"median next-token entropy {rec['realism']['median_entropy']:.2f} nats" in text
    assert "NOT realistic: median entropy" in text  # six steps of a 2-layer model: far from trained
    assert f"sha256 {checkpoint_digest(path)}" in text


def test_written_checkpoint_loads_and_matches_transformers(runs):
    (path, _), _ = runs
    assert {p.name for p in path.iterdir()} >= {"config.json", "generation_config.json", "model.safetensors",
                                                 RECORD_FILE, "tokenizer.json", "tokenizer_config.json"}
    ckpt = load(path, "float32", "cpu")
    assert ckpt.config.num_hidden_layers == 2 and ckpt.config.tie_word_embeddings
    ids = ckpt.tokenizer.encode("def greet(name):\n    \"\"\"Return a greeting.\"\"\"\n    return 'Hello, ' + name")
    with torch.inference_mode():
        ours = ckpt.model(torch.tensor([ids]))[0]
        ref = load_reference(path)(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_the_forward_trains_under_autograd():
    cfg = config_from_dict(config_json("trained-24l", **SMALL))
    model = build_model(cfg, 0, torch.device("cpu")).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    logits = model(torch.tensor([[1, 2, 3]]))
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_learning_rate_warms_up_then_decays_to_the_floor():
    s = TrainSettings(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, s) == pytest.approx(0.1) and lr_at(9, 100, s) == pytest.approx(1.0)
    assert lr_at(10, 100, s) == pytest.approx(1.0) and lr_at(55, 100, s) == pytest.approx(0.55)
    assert lr_at(100, 100, s) == pytest.approx(0.1)


def test_stdlib_corpus_files_are_sorted_and_leave_out_tests_and_packages():
    files = stdlib_files()
    rel = [p.relative_to(stdlib_dir()).as_posix() for p in files]
    assert rel == sorted(rel) and "abc.py" in rel
    assert not any(EXCLUDED_DIRS & set(r.split("/")[:-1]) for r in rel)


def test_entropy_and_margin_of_constructed_logits():
    assert realism.entropy(torch.zeros(8)).item() == pytest.approx(math.log(8))
    assert realism.entropy(torch.tensor([0.0, 0.0, -1e4, -1e4])).item() == pytest.approx(math.log(2))
    assert realism.entropy(torch.tensor([100.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert realism.top2_margin(torch.tensor([[3.0, 1.0, 2.5], [0.0, 7.0, -1.0]])).tolist() == [0.5, 7.0]


class NextTokenModel(nn.Module):
    """Logits over 16 tokens: uniform when `uniform`, else the next id (last + 1) wins over last + 2 by a margin
    of (last + 1) / 10."""

    def __init__(self, uniform=False):
        super().__init__()
        self.uniform = uniform
        self.config = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=2,
                                      max_position_embeddings=4096)
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def forward(self, ids, cache=None, last_only=False):
        if cache is not None:
            cache.advance(ids.shape[1])
        ids = ids[:, -1:] if last_only else ids
        logits = torch.zeros(*ids.shape, 16)
        if not self.uniform:
            logits.scatter_(-1, (ids[..., None] + 1) % 16, 5.0)
            logits.scatter_(-1, (ids[..., None] + 2) % 16, 5.0 - (ids[..., None] + 1) / 10)
        return logits


def test_greedy_margins_and_verdict_on_a_constructed_model():
    ids, margins = realism.greedy_margins(NextTokenModel(), [3, 0], new_tokens=10)
    assert ids == list(range(1, 11))
    assert margins == pytest.approx([(t + 1) / 10 for t in range(10)])
    verdict = realism.judge(math.log(16), margins)
    assert verdict["near_tie_steps"] == 4 and verdict["near_tie_fraction"] == 0.4
    assert verdict["min_margin"] == pytest.approx(0.1) and verdict["realistic"]
    assert not realism.judge(0.2, margins)["realistic"]  # one-hot-like
    assert not realism.judge(3.0, [1.0] * 20 + [0.4])["realistic"]  # 1 of 21 near-tied: under 5%


def test_heldout_stats_of_uniform_logits():
    stats = realism.heldout_stats(NextTokenModel(uniform=True), torch.arange(100) % 16, seq_len=8, max_windows=3)
    assert stats["heldout_tokens_scored"] == 24
    assert stats["median_entropy"] == pytest.approx(math.log(16))
    assert stats["heldout_loss"] == pytest.approx(math.log(16))


def test_cli_refuses_before_training(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "x"), "--preset", "trained-24l"]) == 2
    assert "--train-steps" in capsys.readouterr().err
    assert main(["tiny", str(tmp_path / "x"), "--preset", "trained-24l", "--train-steps", "0"]) == 2
    assert "--train-steps: 0 is outside [1, inf]" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["tiny", str(tmp_path / "full"), "--preset", "trained-24l", "--train-steps", "5"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_trained_checkpoint_passes_under_measured_floors(runs, dtype):
    """Logits shaped by training (not a random fixture's one-hot ones): qwenlab against transformers stays inside
    the precision budget measured on the same prompt, accumulated and isolated, in float32 and bfloat16."""
    from qwenlab.activations.floors import Gates
    from qwenlab.checks import layer_diffs as ld
    from qwenlab.checks.nbutil import load_thresholds

    (path, _), _ = runs
    ckpt = load(path, dtype, "cpu")
    ref = load_reference(path, getattr(torch, dtype))
    truth = load_reference(path) if dtype != "float32" else None
    ids = ckpt.tokenizer.encode("def greet(name):\n    \"\"\"Return a greeting.\"\"\"\n    return 'Hello, ' + name")
    gates = Gates.from_thresholds(load_thresholds(None, "03_layer_diffs"))
    diff = ld.prompt_diff(ld.capture_prompt(ckpt.model, ref, truth, ids, "code"), dtype, gates)
    assert diff.result.passed and ld.first_isolated(diff.isolated) is None
    stats = ld.logits_stats(diff.result.logits)
    limits = gates.logits_limits(ld.logits_stats(diff.noise.logits) if diff.noise.logits else {}, dtype)
    assert all(stats[k] <= limits[k] for k in limits), (stats, limits)
