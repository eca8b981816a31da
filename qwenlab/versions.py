"""Library versions recorded in dumps, reports and benchmark output."""
import importlib.metadata as md
import platform

CORE_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "qwenlab")


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
