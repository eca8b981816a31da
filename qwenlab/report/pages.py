"""The HTML of a report run: each executed notebook through nbconvert, and index.html, one self-contained page
(figures embedded) rendered from metrics.json's record. The index reads top to bottom: the verdict table, one key
figure per notebook, then the details (run header, every figure, the metrics flattened to scalars) folded away."""
import base64
import json
import math
import struct
from html import escape
from pathlib import Path

COLOURS = {"pass": "#1a7f37", "regressed": "#cf222e", "error": "#cf222e", "interrupted": "#9a6700", "dead": "#6e4c00"}
MAX_EMBED_BYTES = 3_000_000
MAX_REASONS = 3  # per notebook in the verdict table; the rest are on the notebook's page
MAX_LIST_ITEMS = 8  # a list of scalars longer than this is summarised
MAX_TEXT = 160  # characters of one metric's text before it is cut
WIDE_PX = 800  # a key figure wider than this spans both columns of the index

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1f2328; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
h3 { font-size: 1em; margin: .2em 0; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #d0d7de; padding: 4px 8px;
  text-align: left; vertical-align: top; } th { background: #f6f8fa; }
table.header td:first-child { font-weight: 600; white-space: nowrap; }
table.verdicts { width: 100%; } table.verdicts td.time { white-space: nowrap; text-align: right; }
.badge { color: #fff; border-radius: 4px; padding: 1px 8px; font-weight: 600; text-transform: uppercase; }
tr.verdict-regressed, tr.verdict-error { background: #ffebe9; } tr.verdict-pass { background: #dafbe1; }
.banner { font-size: 1.1em; padding: .4em 1em; border-radius: 6px; color: #fff; display: inline-block; }
.key-figures { display: grid; grid-template-columns: 1fr 1fr; gap: 1em 1.5em; }
.key-figure.wide { grid-column: 1 / -1; } .key-figure figure { margin: 0; }
.key-figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: .85em; color: #59636e; } code { font-size: .9em; }
ul.reasons { margin: 0; padding-left: 1.2em; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; } .muted { color: #59636e; }
table.metrics td:last-child { font-family: ui-monospace, monospace; font-size: .9em; }
"""


def html_exporter():
    from nbconvert import HTMLExporter

    exporter = HTMLExporter()
    exporter.embed_images = True
    return exporter


def notebook_html(exporter, ipynb: Path) -> str:
    import nbformat

    body, _ = exporter.from_notebook_node(nbformat.read(str(ipynb), as_version=4),
                                          resources={"metadata": {"name": ipynb.stem, "path": str(ipynb.parent)}})
    return body


def badge(verdict: str | None) -> str:
    verdict = verdict or "incomplete"
    return f'<span class="badge" style="background:{COLOURS.get(verdict, "#59636e")}">{escape(verdict)}</span>'


# ---------------------------------------------------------------- the verdict table

def why(e: dict) -> str:
    """One line per reason (the first MAX_REASONS), the error, or that every check passed."""
    if e.get("error"):
        err = e["error"]
        where = f" in In [{err['exec_count']}]" if err.get("exec_count") is not None else ""
        return f"<b>{escape(str(err.get('ename')))}</b>{where}: {escape(_cut(str(err.get('evalue'))))}"
    reasons = [str(r) for r in e.get("reasons") or []]
    if not reasons:
        return "<span class=muted>all checks within thresholds</span>"
    more = len(reasons) - MAX_REASONS
    items = "".join(f"<li>{escape(_cut(r))}</li>" for r in reasons[:MAX_REASONS])
    if more > 0:
        items += f"<li class=muted>and {more} more on the notebook's page</li>"
    return f'<ul class="reasons">{items}</ul>'


def notebook_row(i: int, stem: str, e: dict) -> str:
    link = f'<a href="{escape(e["html"])}">{escape(stem)}</a>' if e.get("html") else escape(stem)
    return (f'<tr class="verdict-{escape(e["verdict"])}" id="nb-{escape(stem)}"><td>{i}</td><td>{link}</td>'
            f'<td>{badge(e["verdict"])}</td><td>{why(e)}</td><td class="time">{_seconds(e.get("duration_s"))}</td>'
            "</tr>")


def verdict_table(notebooks: dict) -> str:
    rows = "".join(notebook_row(i, stem, e) for i, (stem, e) in enumerate(notebooks.items(), 1))
    return ('<table class="verdicts"><tr><th>#</th><th>notebook</th><th>verdict</th><th>why</th><th>time</th></tr>'
            f"{rows}</table>")


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---------------------------------------------------------------- key figures

def key_figure(run_dir: Path, stem: str, e: dict) -> str | None:
    """The figure the notebook marked key (nbutil.save_figure(..., key=True), recorded in metrics/<stem>.json),
    else its only figure; None when it saved several and marked none."""
    figures = e.get("figures") or []
    try:
        marked = json.loads((run_dir / "metrics" / f"{stem}.json").read_text()).get("key_figure")
    except (OSError, ValueError, AttributeError):
        marked = None
    if marked in figures:
        return marked
    return figures[0] if len(figures) == 1 else None


def image_src(run_dir: Path, rel: str) -> str:
    path = run_dir / rel
    if path.is_file() and path.stat().st_size <= MAX_EMBED_BYTES:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return escape(rel)


def is_wide(path: Path) -> bool:
    """A PNG wider than WIDE_PX (a heatmap, side-by-side panels) gets the page's full width; narrower ones share a
    row, two by two."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
        width = struct.unpack(">I", head[16:20])[0]
    except (OSError, struct.error):
        return False
    return head[:8] == b"\x89PNG\r\n\x1a\n" and width > WIDE_PX


def figure_name(stem: str, rel: str) -> str:
    return Path(rel).stem.removeprefix(f"{stem}_")


def key_figure_html(run_dir: Path, stem: str, e: dict) -> str:
    figures = e.get("figures") or []
    rel = key_figure(run_dir, stem, e)
    title = f'<h3><a href="#nb-{escape(stem)}">{escape(stem)}</a> {badge(e["verdict"])}</h3>'
    if rel is None:
        note = ("no figures were saved" if not figures else
                f"{len(figures)} figures, none marked key: see the details below")
        return f'<div class="key-figure" data-notebook="{escape(stem)}">{title}<p class=muted>{note}</p></div>'
    others = len(figures) - 1
    more = f" · {others} more figure{'s' if others > 1 else ''} in the details" if others else ""
    wide = " wide" if is_wide(run_dir / rel) else ""
    return (f'<div class="key-figure{wide}" data-notebook="{escape(stem)}">{title}<figure>'
            f'<a href="{escape(rel)}"><img class="key" src="{image_src(run_dir, rel)}" alt="{escape(rel)}"></a>'
            f"<figcaption>{escape(figure_name(stem, rel))}{more}</figcaption></figure></div>")


# ---------------------------------------------------------------- details: files, run header, metrics

def files_html(stem: str, e: dict) -> str:
    pages = [f'<a href="{escape(e[k])}">{k}</a>' for k in ("html", "ipynb") if e.get(k)]
    pages.append(f'<a href="#metrics-{escape(stem)}">metrics</a>')
    figures = [f'<a href="{escape(f)}">{escape(figure_name(stem, f))}</a>' for f in e.get("figures") or []]
    text = " · ".join(pages)
    if figures:
        text += " &nbsp; figures: " + ", ".join(figures)
    return f"<li><b>{escape(stem)}</b>: {text}</li>"


def header_rows(h: dict) -> list[tuple[str, str]]:
    v = h.get("versions") or {}
    dirty = " (uncommitted changes)" if h.get("git_dirty") else ""
    seeds = h.get("seeds") or {}
    seed_text = "; ".join(f"{nb}: " + ", ".join(f"{k}={val}" for k, val in s.items()) for nb, s in seeds.items())
    params = h.get("parameters") or {}
    param_text = ", ".join(f"{k}={json.dumps(val)}" for k, val in (params.get("global") or {}).items())
    param_text += "".join(f"; {nb}: " + ", ".join(f"{k}={json.dumps(val)}" for k, val in p.items())
                          for nb, p in (params.get("scoped") or {}).items())
    return [
        ("run", h.get("run", "")),
        ("started (UTC)", f"{h.get('started_utc', '')}  ({h.get('duration_s')} s)"),
        ("git commit", f"{h.get('git_commit', 'unknown')}{dirty}"),
        ("torch / transformers / tokenizers",
         f"{v.get('torch')} / {v.get('transformers')} / {v.get('tokenizers')}"),
        ("python / papermill / nbconvert", f"{v.get('python')} / {v.get('papermill')} / {v.get('nbconvert')}"),
        ("kernel", f"{(h.get('kernel') or {}).get('spec')}: {((h.get('kernel') or {}).get('argv') or ['?'])[0]}"),
        ("process", f"pid {h.get('pid')} on {h.get('host')}, last heartbeat {h.get('heartbeat_utc')}"),
        ("device / dtype", f"{h.get('device')} / {h.get('dtype')}"),
        ("notebooks at once", f"{h.get('jobs', 1)} ({h.get('jobs_reason', '')})" + "".join(
            f"; {stem} alone: {why}" for stem, why in (h.get("runs_alone") or {}).items())),
        ("model path", h.get("model_path", "")),
        ("config hash", h.get("config_hash", "")),
        ("seeds", seed_text or "(no notebook declares a seed parameter)"),
        ("thresholds", h.get("thresholds_dir") or "data/thresholds (default)"),
        ("candidate dump", h.get("candidate") or "(none)"),
        ("parameters", param_text or "(defaults)"),
        ("command", h.get("command", "")),
    ]


def scalar_rows(metrics, prefix: str = "") -> list[tuple[str, str]]:
    """Metrics flattened to (dotted key, text) rows of scalars: dicts are walked, short lists of scalars joined,
    long lists summarised (count and range), lists of records or lists counted and left to metrics.json."""
    if isinstance(metrics, dict):
        if not metrics:
            return [(prefix, "(empty)")] if prefix else []
        rows = []
        for k, v in metrics.items():
            rows += scalar_rows(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(metrics, (list, tuple)):
        return [(prefix, list_text(list(metrics)))]
    return [(prefix, scalar_text(metrics))]


def scalar_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (int, str)):
        return _cut(str(value))
    return _cut(type(value).__name__)


def list_text(values: list) -> str:
    if not values:
        return "(empty list)"
    if all(isinstance(v, dict) for v in values):
        fields = list(dict.fromkeys(k for v in values for k in v))
        shown = ", ".join(fields[:6]) + (", …" if len(fields) > 6 else "")
        return f"{len(values)} record{'s' if len(values) > 1 else ''} ({shown}): see metrics.json"
    if any(isinstance(v, (dict, list, tuple)) for v in values):
        return f"{len(values)} nested values: see metrics.json"
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(values) > MAX_LIST_ITEMS:
        if len(numbers) == len(values):
            return f"{len(values)} values, min {scalar_text(min(numbers))}, max {scalar_text(max(numbers))}"
        return f"{len(values)} values: " + ", ".join(scalar_text(v) for v in values[:4]) + ", …"
    return ", ".join(scalar_text(v) for v in values)


def metrics_table(stem: str, e: dict) -> str:
    """The notebook's metrics as scalar rows, folded (opened by a link to #metrics-<stem>)."""
    rows = scalar_rows(e.get("metrics") or {})
    body = "".join(f"<tr><td><code>{escape(k)}</code></td><td>{escape(v)}</td></tr>" for k, v in rows)
    table = f'<table class="metrics">{body}</table>' if rows else "<p class=muted>no metrics were written</p>"
    return (f'<details id="metrics-{escape(stem)}"><summary>{escape(stem)} '
            f"<span class=muted>({len(rows)} values)</span></summary>{table}</details>")


def interruption_html(h: dict) -> str:
    """The notice of a run that was interrupted or died: which notebook was running, which never ran."""
    if h.get("status") not in ("interrupted", "dead"):
        return ""
    key = "interrupted_notebook" if h["status"] == "interrupted" else "dead_notebook"
    running = h.get(f"{key}s") or ([h[key]] if h.get(key) else [])  # several when notebooks ran at once (--jobs)
    where = f"during {', '.join(f'<b>{escape(stem)}</b>' for stem in running)}" if running else "between notebooks"
    not_run = ", ".join(escape(stem) for stem in h.get("not_run") or []) or "none"
    if h["status"] == "dead":
        return (f'<p id="dead">This run died {where} ({escape(str(h.get("died")))}; found by run '
                f'{escape(str(h.get("marked_dead_by")))}): a partial run, not a result (not run: {not_run}).</p>')
    return (f'<p id="interrupted">This run was interrupted {where} by {escape(str(h.get("signal")))}: '
            f"a partial run, not a result (not run: {not_run}).</p>")


def run_line(h: dict, counts: dict) -> str:
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("pass", "regressed", "error"))
    commit = str(h.get("git_commit") or "unknown")[:10] + (" (uncommitted changes)" if h.get("git_dirty") else "")
    took = f", {h['duration_s']:.0f} s" if isinstance(h.get("duration_s"), (int, float)) else ""
    return (f"{escape(summary)} · {escape(str(h.get('device')))} / {escape(str(h.get('dtype')))} · "
            f"{escape(str(h.get('started_utc', '')))}{took} · commit {escape(commit)}")


def render_index(record: dict, run_dir: Path) -> str:
    h = record["header"]
    notebooks = record["notebooks"]
    verdict = record.get("verdict")
    figures = "".join(key_figure_html(run_dir, stem, e) for stem, e in notebooks.items())
    files = "".join(files_html(stem, e) for stem, e in notebooks.items())
    header = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in header_rows(h))
    metrics = "".join(metrics_table(stem, e) for stem, e in notebooks.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qwenlab report {escape(h.get('run', ''))}</title>
<style>{STYLE}</style></head><body>
<h1>qwenlab report: {escape(h.get('model_name', ''))}</h1>
<p><span class="banner" id="overall" style="background:{COLOURS.get(verdict, '#59636e')}">\
overall: {escape(str(verdict))}</span>
&nbsp; {run_line(h, record.get("counts") or {})}</p>{interruption_html(h)}
<h2 id="verdicts">Verdicts</h2>
{verdict_table(notebooks) if notebooks else '<p class=muted>no notebook ran</p>'}
<h2 id="key-figures">Key figures</h2>
<div class="key-figures">{figures or '<p class=muted>no notebook ran</p>'}</div>
<h2 id="details">Details</h2>
<ul>{files}<li><a href="metrics.json">metrics.json</a>: every record in full</li></ul>
<details id="run"><summary>Run: versions, model, seeds, parameters, command</summary>
<table class="header">{header}</table></details>
<h3 id="metrics">Metrics, flattened to scalars <span class=muted>(lists of records: metrics.json)</span></h3>
{metrics or '<p class=muted>no notebook ran</p>'}
</body></html>
"""
