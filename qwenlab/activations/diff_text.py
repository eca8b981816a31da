"""Human-readable summary of a DiffResult (the CLI's non-JSON output): a headline with coverage, a table of the rows
over their floor (every row with all_rows) with shapes, the logits statistics, then what is missing and why."""
from qwenlab.activations.diff import DiffResult

HEADLINES = {"pass": "PASS", "diverged": "FAIL", "incomplete": "FAIL (incomplete)",
             "nothing_compared": "ERROR (nothing compared)",
             "reference_nonfinite": "ERROR (the reference holds NaN or inf: it cannot judge)"}
LISTED = 4


def _names(names: list[str], limit: int = LISTED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def shape_text(row: dict) -> str:
    ref, cand = row["shape"], row["cand_shape"]
    if cand is None or row["status"] == "only_in_candidate" or cand == ref:
        return str(ref)
    return f"cand {cand} vs ref {ref}"


def headline(result: DiffResult) -> str:
    cov = result.coverage
    compared = f"{result.compared} tensors compared"
    if cov is not None:
        compared = f"{cov.compared} of {cov.reference_names} reference tensors compared ({cov.fraction:.0%})"
    kind = "isolated (each layer fed the reference's input), " if result.isolated else ""
    return (f"{kind}dtype {result.dtype}: {compared}, {HEADLINES[result.verdict]}; "
            f"first divergence: {result.first_divergence or 'none'}")


def table(rows: list[dict]) -> list[str]:
    lines = [f"  {'name':<40} {'status':<19} {'rel_l2':>9} {'floor':>7}  shape"]
    for row in rows:
        rel = "-" if row["rel_l2"] != row["rel_l2"] else f"{row['rel_l2']:.3g}"
        lines.append(f"  {row['name']:<40} {row['status']:<19} {rel:>9} {row['floor']:>7.1g}  {shape_text(row)}")
        if row.get("note"):
            lines.append(f"  {'':<40} {row['note']}")
    return lines


def coverage_lines(result: DiffResult) -> list[str]:
    cov = result.coverage
    if cov is None:
        return []
    lines = []
    if cov.missing:
        verdict = "allowed by --allow-missing" if cov.allow_missing else \
            "pass --allow-missing or list them in the candidate's not_produced metadata"
        lines.append(f"missing from the candidate: {len(cov.missing)} ({_names(cov.missing)}); {verdict}")
    if cov.not_produced:
        lines.append(f"declared not produced by the candidate: {len(cov.not_produced)} ({_names(cov.not_produced)})")
    if cov.suggestions:
        pairs = [f"{name} -> {canonical}" for name, canonical in cov.suggestions.items()]
        lines.append(f"did you mean: {_names(pairs)}")
    return lines


def summary_text(result: DiffResult, max_rows: int = 12, all_rows: bool = False) -> str:
    lines = [headline(result)]
    if result.same_file:
        lines.append(f"note: candidate and reference are the same file ({result.same_file}): nothing independent "
                     "was compared")
    if result.prompt_warning:
        lines.append(f"warning: {result.prompt_warning}")
    shown = [r for r in result.rows if all_rows or r["exceeds"] or r["status"] == "reference_nonfinite"]
    if shown:
        lines += table(shown if all_rows else shown[:max_rows])
    if not all_rows and len(shown) > max_rows:
        lines.append(f"  ... {len(shown) - max_rows} more over their floor")
    if result.logits:
        lg = result.logits
        positions = f"{lg['positions']} position{'s' if lg['positions'] != 1 else ''}"
        if lg.get("nonfinite"):
            lines.append(f"logits ({positions}): not compared: the {lg['nonfinite']} logits hold NaN or +inf")
        else:
            lines.append(f"logits ({positions}): KL mean {lg['kl_mean']:.3g} max {lg['kl_max']:.3g}, "
                         f"top-1 agreement {lg['top1_agreement']:.1%}, delta-p mean {lg['delta_p_mean']:.3g}")
    lines += coverage_lines(result)
    if result.only_in_candidate:
        unmatched = [n for n in result.only_in_candidate if not (result.coverage and n in result.coverage.suggestions)]
        if unmatched:
            lines.append(f"only in candidate (not compared): {len(unmatched)} ({_names(unmatched)})")
    return "\n".join(lines)


def nothing_compared(result: DiffResult, cand, ref) -> str:
    """The one-line error for a diff with no name in common (exit 2: nothing was checked)."""
    hint = next(iter(result.coverage.suggestions.items()), None) if result.coverage else None
    return (f"nothing compared: none of the {len(result.only_in_candidate)} tensor names of {cand} is among the "
            f"{len(result.only_in_reference)} of {ref} (canonical names: doc/dump-format.md)"
            + (f"; e.g. {hint[0]} -> {hint[1]}" if hint else ""))
