"""index.html's structure, rendered from a hand-made run folder: the verdict table first, exactly one key figure per
notebook (the one it marked, not the first file), details after, and metrics flattened to scalars (no Python reprs);
nbutil records the key figure a notebook marks."""
import json
import re
from html import unescape
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from qwenlab.checks import nbutil
from qwenlab.report.pages import MAX_REASONS, render_index, scalar_rows


def save_png(run_dir: Path, name: str, colour: str, size=(1, 1)) -> str:
    fig, ax = plt.subplots(figsize=size)
    ax.plot([0, 1], [0, 1], color=colour)
    fig.savefig(run_dir / "figures" / f"{name}.png")
    plt.close(fig)
    return f"figures/{name}.png"


def entry(verdict: str, figures: list[str], metrics: dict | None = None, reasons=(), error=None) -> dict:
    return {"verdict": verdict, "reasons": list(reasons), "metrics": metrics or {}, "error": error,
            "duration_s": 12.3, "parameters": {}, "ipynb": None, "html": None, "figures": figures}


@pytest.fixture
def run_dir(tmp_path):
    for sub in ("figures", "metrics"):
        (tmp_path / sub).mkdir()
    return tmp_path


def index_of(run_dir: Path, notebooks: dict) -> str:
    header = {"run": "r", "model_name": "tiny-qwen3", "device": "cpu", "dtype": "float32", "duration_s": 40.0,
              "started_utc": "2026-01-01T00:00:00Z", "git_commit": "0123456789abcdef", "status": "complete"}
    counts = {v: sum(e["verdict"] == v for e in notebooks.values()) for v in ("pass", "regressed", "error")}
    record = {"header": header, "notebooks": notebooks, "verdict": "regressed", "counts": counts}
    return render_index(record, run_dir)


def mark_key(run_dir: Path, stem: str, rel: str | None):
    record = {"notebook": stem, "verdict": "pass", "reasons": [], "key_figure": rel, "metrics": {}}
    (run_dir / "metrics" / f"{stem}.json").write_text(json.dumps(record))


def key_figures(index: str) -> dict:
    """notebook -> the figure its key-figure block shows (None when it shows none)."""
    blocks = re.findall(r'<div class="key-figure(?: wide)?" data-notebook="([\w-]+)">(.*?)</div>', index, re.S)
    return {nb: (re.findall(r'<a href="(figures/[\w.-]+)"><img class="key"', body) or [None])[0]
            if body.count('class="key"') <= 1 else "several" for nb, body in blocks}


NESTED = {"max_rel_l2": 1.5e-7, "first_divergence": None, "tied": True,
          "per_prompt": [{"prompt": "Hello", "rel_l2": 0.1}, {"prompt": "Bye", "rel_l2": 0.2}],
          "logits": {"kl_mean": 1e-9, "top1": 1.0}, "stop_ids_seen": [151643, 151645],
          "kl_per_position": [0.001 * i for i in range(300)], "names": [f"layer{i}" for i in range(20)],
          "grid": [[1, 2], [3, 4]], "empty": {}, "nothing": [], "long": "x" * 500}


def test_index_reads_verdicts_then_one_key_figure_each_then_details(run_dir):
    a = save_png(run_dir, "01_a_line", "red")
    detail, main = save_png(run_dir, "02_b_detail", "blue"), save_png(run_dir, "02_b_main", "green")
    one = save_png(run_dir, "03_c_one", "black", size=(9, 2))  # 900 px wide, a heatmap: full width
    x, y = save_png(run_dir, "04_d_x", "red"), save_png(run_dir, "04_d_y", "red")
    mark_key(run_dir, "02_b", main)  # the main figure sorts after the planted-style detail: chosen, not first
    mark_key(run_dir, "04_d", None)
    reasons = [f"check {i} = 2 exceeds 1" for i in range(MAX_REASONS + 2)]
    notebooks = {"01_a": entry("pass", [a], NESTED), "02_b": entry("regressed", [detail, main], reasons=reasons),
                 "03_c": entry("error", [one], error={"ename": "ValueError", "evalue": "boom", "exec_count": 4}),
                 "04_d": entry("pass", [x, y]), "05_e": entry("pass", [])}

    index = index_of(run_dir, notebooks)

    body = index[index.index("<body>"):]
    order = [body.index(s) for s in ('id="verdicts"', '<table class="verdicts">', 'id="key-figures"',
                                     'id="details"', 'id="run"', 'id="metrics"')]
    assert order == sorted(order) and body.index("<table") == body.index('<table class="verdicts">')
    rows = re.findall(r'<tr class="verdict-(\w+)" id="nb-([\w-]+)">(.*?)</tr>', body, re.S)
    assert [(nb, v) for v, nb, _ in rows] == [("01_a", "pass"), ("02_b", "regressed"), ("03_c", "error"),
                                             ("04_d", "pass"), ("05_e", "pass")]
    cells = dict((nb, row) for _, nb, row in rows)
    assert "all checks within thresholds" in cells["01_a"] and "12 s" in cells["01_a"]
    assert all(r in cells["02_b"] for r in reasons[:MAX_REASONS]) and reasons[-1] not in cells["02_b"]
    assert "and 2 more" in cells["02_b"]
    assert "ValueError" in cells["03_c"] and "boom" in cells["03_c"] and "In [4]" in cells["03_c"]

    assert key_figures(index) == {"01_a": a, "02_b": main, "03_c": one, "04_d": None, "05_e": None}
    assert index.count('<img class="key"') == 3
    assert '<div class="key-figure wide" data-notebook="03_c">' in index
    assert '<div class="key-figure" data-notebook="01_a">' in index
    assert "none marked key" in index and "no figures were saved" in index
    details = body[body.index('id="details"'):]
    assert all(f'href="{f}"' in details for f in (a, detail, main, one, x, y)) and 'href="metrics.json"' in details


def test_metrics_section_has_scalars_and_no_python_reprs(run_dir):
    notebooks = {"01_a": entry("pass", [], NESTED)}
    index = index_of(run_dir, notebooks)
    section = unescape(index[index.index('id="metrics"'):])
    assert "[{" not in section and "{'" not in section and "[[" not in section
    rows = dict(re.findall(r"<tr><td><code>([\w.]+)</code></td><td>(.*?)</td></tr>", section))
    assert rows["max_rel_l2"] == "1.5e-07" and rows["first_divergence"] == "none" and rows["tied"] == "true"
    assert rows["logits.kl_mean"] == "1e-09" and rows["stop_ids_seen"] == "151643, 151645"
    assert rows["per_prompt"].startswith("2 records (prompt, rel_l2)") and "metrics.json" in rows["per_prompt"]
    assert rows["kl_per_position"] == "300 values, min 0, max 0.299"
    assert rows["names"].startswith("20 values: layer0, layer1")
    assert rows["grid"] == "2 nested values: see metrics.json" and rows["empty"] == "(empty)"
    assert rows["nothing"] == "(empty list)" and len(rows["long"]) < 200


def test_scalar_rows_of_the_real_shapes_stay_short():
    metrics = {"variants": [{"variant": f"v{i}", "kl_mean": 0.1 * i} for i in range(4)],
               "weights": {"tensors": 28, "worst": {"name": "layers.0.mlp.down_proj", "rel_l2": 0.1}}}
    assert scalar_rows(metrics) == [("variants", "4 records (variant, kl_mean): see metrics.json"),
                                    ("weights.tensors", "28"), ("weights.worst.name", "layers.0.mlp.down_proj"),
                                    ("weights.worst.rel_l2", "0.1")]


def test_save_figure_key_is_recorded_by_write_metrics(tmp_path):
    fig, _ = plt.subplots(figsize=(1, 1))
    nbutil.save_figure(fig, tmp_path, "09_x", "detail")
    nbutil.save_figure(fig, tmp_path, "09_x", "main", key=True)
    nbutil.save_figure(fig, tmp_path, "09_x", "fallback", key=True)  # a later candidate: the first marked wins
    nbutil.save_figure(fig, tmp_path, "08_y", "only")
    plt.close(fig)

    assert nbutil.write_metrics(tmp_path, "09_x", {"a": 1}, [])["key_figure"] == "figures/09_x_main.png"
    assert nbutil.write_metrics(tmp_path, "08_y", {"a": 1}, [])["key_figure"] is None
    written = json.loads((tmp_path / "metrics" / "09_x.json").read_text())
    assert written["key_figure"] == "figures/09_x_main.png" and written["metrics"] == {"a": 1}
    assert (tmp_path / written["key_figure"]).is_file()
