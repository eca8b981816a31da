"""Library versions recorded in dumps, reports and benchmark output, and the interpreter that runs them."""
import importlib.metadata as md
import platform
import sys
from pathlib import Path

CORE_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "qwenlab")
ENVIRONMENT_PACKAGES = ("qwenlab", "torch", "transformers")


def package_versions(packages=CORE_PACKAGES, missing=None) -> dict:
    """{"python": ..., package: version} for each installed package; `missing` for the others (None = left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            if missing is not None:
                out[pkg] = missing
    return out


def environment() -> dict:
    """Which Python runs this process and what it imports: the interpreter, the qwenlab package's folder (two
    checkouts have the same version) and the versions of the packages the results depend on."""
    return {"executable": sys.executable, "prefix": sys.prefix, "qwenlab_path": str(Path(__file__).resolve().parent),
            **package_versions(ENVIRONMENT_PACKAGES, missing="not installed")}
