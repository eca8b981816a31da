"""The HTML of a report run: each executed notebook through nbconvert, and index.html, one self-contained page
(figures embedded) rendered from metrics.json's record."""
import base64
from html import escape
from pathlib import Path

COLOURS = {"pass": "#1a7f37", "regressed": "#cf222e", "error": "#cf222e", "interrupted": "#9a6700", "dead": "#6e4c00"}
MAX_EMBED_BYTES = 3_000_000
MAX_METRIC_ROWS = 200

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1f2328; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #d0d7de; padding: 4px 8px;
  text-align: left; vertical-align: top; } th { background: #f6f8fa; }
table.header td:first-child { font-weight: 600; white-space: nowrap; }
.badge { color: #fff; border-radius: 4px; padding: 1px 8px; font-weight: 600; text-transform: uppercase; }
tr.verdict-regressed, tr.verdict-error { background: #ffebe9; } tr.verdict-pass { background: #dafbe1; }
.banner { font-size: 1.1em; padding: .6em 1em; border-radius: 6px; color: #fff; display: inline-block; }
figure { display: inline-block; margin: .5em 1em .5em 0; } figure img { max-width: 520px; border: 1px solid #d0d7de; }
figcaption { font-size: .85em; color: #59636e; } code { font-size: .9em; } ul.reasons { margin: 0; padding-left: 1.2em; }
details { margin: .3em 0; } .muted { color: #59636e; }
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


def header_rows(h: dict) -> list[tuple[str, str]]:
    v = h.get("versions") or {}
    dirty = " (uncommitted changes)" if h.get("git_dirty") else ""
    seeds = h.get("seeds") or {}
    seed_text = "; ".join(f"{nb}: " + ", ".join(f"{k}={val}" for k, val in s.items()) for nb, s in seeds.items())
    params = h.get("parameters") or {}
    param_text = ", ".join(f"{k}={val!r}" for k, val in (params.get("global") or {}).items())
    param_text += "".join(f"; {nb}: " + ", ".join(f"{k}={val!r}" for k, val in p.items())
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
        ("model path", h.get("model_path", "")),
        ("config hash", h.get("config_hash", "")),
        ("seeds", seed_text or "(no notebook declares a seed parameter)"),
        ("thresholds", h.get("thresholds_dir") or "data/thresholds (default)"),
        ("candidate dump", h.get("candidate") or "(none)"),
        ("parameters", param_text or "(defaults)"),
        ("command", h.get("command", "")),
    ]


def notebook_row(i: int, stem: str, e: dict) -> str:
    link = f'<a href="{escape(e["html"])}">{escape(stem)}</a>' if e.get("html") else escape(stem)
    files = " · ".join(f'<a href="{escape(e[k])}">{k}</a>' for k in ("html", "ipynb") if e.get(k))
    details = []
    if e.get("error"):
        err = e["error"]
        where = f" in In [{err['exec_count']}]" if err.get("exec_count") is not None else ""
        details.append(f"<b>{escape(str(err.get('ename')))}</b>{where}: {escape(str(err.get('evalue')))}")
    if e.get("reasons"):
        details.append('<ul class="reasons">' + "".join(f"<li>{escape(str(r))}</li>" for r in e["reasons"]) + "</ul>")
    return (f'<tr class="verdict-{escape(e["verdict"])}" id="nb-{escape(stem)}"><td>{i}</td><td>{link}</td>'
            f'<td>{badge(e["verdict"])}</td><td>{_seconds(e.get("duration_s"))}</td>'
            f'<td>{"".join(details) or "<span class=muted>all checks within thresholds</span>"}</td>'
            f"<td>{files}</td></tr>")


def _seconds(value) -> str:
    return "-" if value is None else f"{value} s"


def flatten(metrics, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(metrics, list) and len(metrics) > 8:
        rows.append((prefix, f"[{len(metrics)} values: {', '.join(map(_short, metrics[:4]))}, ...]"))
    else:
        rows.append((prefix, metrics if not isinstance(metrics, list) else "[" + ", ".join(map(_short, metrics)) + "]"))
    return rows


def _short(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def metrics_details(stem: str, e: dict) -> str:
    rows = flatten(e.get("metrics") or {})
    if not rows:
        return ""
    shown = rows[:MAX_METRIC_ROWS]
    more = f"<p class=muted>{len(rows) - len(shown)} more in metrics.json</p>" if len(rows) > len(shown) else ""
    body = "".join(f"<tr><td><code>{escape(k)}</code></td><td>{escape(_short(v))}</td></tr>" for k, v in shown)
    return (f"<details><summary>{escape(stem)}: {len(rows)} metrics</summary><table>{body}</table>{more}"
            f"</details>")


def figure_html(run_dir: Path, rel: str) -> str:
    path = run_dir / rel
    caption = escape(Path(rel).stem)
    if path.is_file() and path.stat().st_size <= MAX_EMBED_BYTES:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    else:
        src = escape(rel)
    return f'<figure><img src="{src}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def interruption_html(h: dict) -> str:
    """The notice of a run that was interrupted or died: which notebook was running, which never ran."""
    if h.get("status") not in ("interrupted", "dead"):
        return ""
    running = h.get("interrupted_notebook" if h["status"] == "interrupted" else "dead_notebook")
    where = f"during <b>{escape(running)}</b>" if running else "between notebooks"
    not_run = ", ".join(escape(stem) for stem in h.get("not_run") or []) or "none"
    if h["status"] == "dead":
        return (f'<p id="dead">This run died {where} ({escape(str(h.get("died")))}; found by run '
                f'{escape(str(h.get("marked_dead_by")))}): a partial run, not a result (not run: {not_run}).</p>')
    return (f'<p id="interrupted">This run was interrupted {where} by {escape(str(h.get("signal")))}: '
            f"a partial run, not a result (not run: {not_run}).</p>")


def render_index(record: dict, run_dir: Path) -> str:
    h = record["header"]
    notebooks = record["notebooks"]
    counts = record.get("counts") or {}
    verdict = record.get("verdict")
    rows = "".join(notebook_row(i, stem, e) for i, (stem, e) in enumerate(notebooks.items(), 1))
    figures = "".join(
        f"<h3>{escape(stem)} {badge(e['verdict'])}</h3>" + "".join(figure_html(run_dir, f) for f in e["figures"])
        for stem, e in notebooks.items() if e.get("figures"))
    metrics = "".join(metrics_details(stem, e) for stem, e in notebooks.items())
    header = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in header_rows(h))
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in ("pass", "regressed", "error"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qwenlab report {escape(h.get('run', ''))}</title>
<style>{STYLE}</style></head><body>
<h1>qwenlab report: {escape(h.get('model_name', ''))}</h1>
<p><span class="banner" id="overall" style="background:{COLOURS.get(verdict, '#59636e')}">overall: {escape(str(verdict))}</span>
&nbsp; {escape(summary)} &nbsp; <a href="metrics.json">metrics.json</a></p>{interruption_html(h)}
<h2>Run</h2><table class="header">{header}</table>
<h2>Notebooks</h2>
<table class="notebooks"><tr><th>#</th><th>notebook</th><th>verdict</th><th>time</th><th>reasons / error</th>
<th>files</th></tr>{rows}</table>
<h2>Figures</h2>{figures or '<p class=muted>no figures were saved</p>'}
<h2>Metrics</h2>{metrics or '<p class=muted>no metrics were written</p>'}
</body></html>
"""
