"""Human-readable summary of a DiffResult (the CLI's non-JSON output)."""
from qwenlab.activations.diff import DiffResult


def summary_text(result: DiffResult, max_rows: int = 12) -> str:
    lines = [f"dtype {result.dtype}: {result.compared} tensors compared, "
             f"{'PASS' if result.passed else 'FAIL'}; first divergence: {result.first_divergence or 'none'}"]
    flagged = [r for r in result.rows if r["exceeds"]]
    for row in flagged[:max_rows]:
        lines.append(f"  {row['name']:<42} {row['status']:<15} rel_l2 {row['rel_l2']:.3g} (floor {row['floor']:.1g})")
    if len(flagged) > max_rows:
        lines.append(f"  ... {len(flagged) - max_rows} more over their floor")
    if result.logits:
        lg = result.logits
        lines.append(f"logits: KL mean {lg['kl_mean']:.3g} max {lg['kl_max']:.3g}, top-1 agreement "
                     f"{lg['top1_agreement']:.1%}, delta-p mean {lg['delta_p_mean']:.3g}")
    for side in ("only_in_candidate", "only_in_reference"):
        names = getattr(result, side)
        if names:
            lines.append(f"{side.replace('_', ' ')}: {len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    return "\n".join(lines)
