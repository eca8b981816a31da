"""Where the repository's folders are: data/ (inputs), reports/ (outputs), notebooks/."""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
REPORTS_DIR = REPO_ROOT / "reports"


def resolve_out_dir(out_dir: str | os.PathLike | None) -> Path:
    """The run folder given by the report, or reports/scratch for interactive use (created)."""
    path = Path(out_dir) if out_dir else REPORTS_DIR / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path
