"""Stress matrix: the leak detector, crash recording and the CLI's exit codes, on the tiny fixture (CPU RSS)."""
import argparse
import json

import pytest

from qwenlab.checks import memory_fluctuation as memory_notebook
from qwenlab.memory import scripted_chat, stress, stress_matrix
from qwenlab.model.loader import load
from qwenlab.model.tiny import ensure_tiny
from tests.memory.faults import CRASH_ENV, LEAK_ENV, Faults

FAST = ["--turns", "2", "--max-new-tokens", "2", "--strategies", "session"]


@pytest.fixture(scope="module")
def ckpt():
    return load(ensure_tiny(), "float32", "cpu")


def config(**kw):
    base = dict(strategies=("session",), iterations=4, turns=3, max_new_tokens=2, leak_threshold_mb=16.0)
    return stress_matrix.StressConfig(**(base | kw))


def test_script_has_six_turns():
    system, turns = scripted_chat.load_script()
    assert system and len(turns) == 6


def test_no_leak_passes(ckpt):
    result = stress_matrix.run_matrix(config(), ckpt=ckpt)
    assert result.passed, result.reasons
    row = result.summary.iloc[0]
    assert row["verdict"] == "pass" and row["crashes"] == 0 and abs(row["growth_mb"]) < 16
    assert len(result.iterations) == 4 and result.iterations["ok"].all()
    assert (result.iterations["baseline_bytes"] > 0).all()
    assert len(result.turns) == 4 * 3 and (result.turns["peak_bytes"] > 0).all()


def test_planted_leak_is_flagged(ckpt):
    # 8 MB kept alive per turn x 3 turns: the baseline climbs ~24 MB per iteration, ~48 MB after warm-up.
    result = stress_matrix.run_matrix(config(), ckpt=ckpt, on_turn=Faults(leak_mb=8.0))
    row = result.summary.iloc[0]
    assert not result.passed and row["leak"] and row["verdict"] == "LEAK"
    assert row["growth_mb"] > 30 and row["slope_mb_per_iter"] > 15
    assert "leak" in result.reasons[0]
    assert "VERDICT stress: FAIL" in stress.verdict_line(result)


def test_crash_is_recorded_not_raised(ckpt):
    cfg = config(strategies=("session", "replay"), iterations=3, turns=2, max_new_tokens=1)
    result = stress_matrix.run_matrix(cfg, ckpt=ckpt, on_turn=Faults(crash_iteration=1))
    it = result.iterations
    assert len(it) == 6  # every iteration of both strategies ran
    crashed = it[~it["ok"]]
    assert list(crashed["iteration"]) == [1, 1]
    assert crashed["error"].str.contains("planted crash").all()
    assert list(result.summary["crashes"]) == [1, 1] and list(result.summary["verdict"]) == ["CRASH", "CRASH"]
    assert not result.passed and "crashed" in result.reasons[0]
    json.dumps(result.to_json(), allow_nan=False)


def test_fresh_process_records_a_crashing_child(monkeypatch):
    monkeypatch.setenv(CRASH_ENV, "1")
    cfg = config(iterations=2, turns=1, max_new_tokens=1, fresh_process=True, child_module="tests.memory.faults")
    result = stress_matrix.run_matrix(cfg)
    it = result.iterations
    assert list(it["ok"]) == [True, False]
    assert it.loc[0, "baseline_bytes"] > 0
    assert it.loc[1, "error"].startswith("exit 1") and "planted crash" in it.loc[1, "error"]
    monkeypatch.setenv(LEAK_ENV, "16")
    monkeypatch.delenv(CRASH_ENV)
    leaking = stress_matrix.run_matrix(config(iterations=2, turns=1, max_new_tokens=1, fresh_process=True,
                                              child_module="tests.memory.faults"))
    assert leaking.passed  # a fresh process per iteration: what one iteration leaks dies with it
    assert not result.passed


def test_cli_exit_codes(capsys, tmp_path):
    out = tmp_path / "stress.json"
    assert stress.main(FAST + ["--iterations", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "strategy" in text and "VERDICT stress: PASS" in text
    payload = json.loads(out.read_text())
    assert payload["passed"] is True and payload["summary"][0]["strategy"] == "session"

    assert stress.main(["--strategies", "session,nope"]) == 2
    assert "--strategies" in capsys.readouterr().err


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser()
    stress.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["stress", "--iterations", "3", "--fresh-process", "--empty-cache", "on"])
    cfg = stress.config_from_args(args)
    assert args.func is stress.cmd_stress
    assert cfg.iterations == 3 and cfg.fresh_process and cfg.empty_cache and cfg.preallocate
    assert cfg.strategies == ("session", "rebuild", "replay") and cfg.turns == 6


def test_memory_verdict_cuda_branch_with_a_faked_allocator(ckpt, monkeypatch):
    """The CUDA half of notebook 05's verdict, on CPU: the tracker reads a fake torch.cuda allocator."""
    import pandas as pd
    import torch

    from qwenlab.generation.sampling import SamplingParams
    from qwenlab.memory.predict import weights_check
    from qwenlab.memory.tracker import MemoryTracker

    stats = {"allocated_bytes.all.current": 100 * 2 ** 20, "reserved_bytes.all.current": 300 * 2 ** 20,
             "allocated_bytes.all.peak": 150 * 2 ** 20, "reserved_bytes.all.peak": 300 * 2 ** 20}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: stats)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 ** 30, 2 ** 32))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    _, turns = scripted_chat.load_script()
    params = SamplingParams(max_new_tokens=2)
    frames = {}
    for policy in ("off", "on"):
        rows, tracker = scripted_chat.run_chat(ckpt, scripted_chat.Policy("session"), turns[:2], params,
                                               tracker=MemoryTracker("cuda", uss="off"), empty_cache=policy)
        frames[policy] = rows
    assert rows[0]["peak_bytes"] == 150 * 2 ** 20 and rows[0]["end_reserved_bytes"] == 300 * 2 ** 20
    timeline = tracker.frame()
    kv = pd.DataFrame({"layout": ["preallocated", "grown"], "rel_error": [0.0, 0.0], "cuda_rel_error": [0.001, 0.12],
                       "workspace_ratio": [0.7, float("nan")]})
    weights = weights_check(ckpt.model, float(stats["allocated_bytes.all.current"]), 0.01)
    result = stress_matrix.run_matrix(config(iterations=2, turns=1, max_new_tokens=1), ckpt=ckpt)
    thresholds = {"weights_rel_error_max": 0.01, "kv_rel_error_max": 0.01, "kv_grown_overhead_max": 0.25,
                  "workspace_ratio_max": 3.0}
    metrics, reasons = memory_notebook.verdict(
        thresholds, device="cuda:0", weights=weights, kv=kv, timeline=timeline,
        empty_cache_frame=pd.DataFrame(frames["off"] + frames["on"]), strategies_frame=pd.DataFrame(frames["on"]),
        stress=result)
    assert metrics["fragmentation_max_bytes"] == 200 * 2 ** 20
    assert metrics["workspace_ratio"] == 0.7 and metrics["kv_cuda_rel_error"] == 0.001
    assert metrics["kv_cuda_grown_overhead"] == 0.12
    assert metrics["empty_cache_off_turn_end_mean_bytes"] == 300 * 2 ** 20
    assert "weights_cuda_allocated_after_load_rel_error" in metrics
    # the fake allocator's 100 MiB is not the tiny model's 38 MiB of weights: flagged, like a kept copy would be
    assert len(reasons) == 1 and "CUDA allocated after load" in reasons[0]
