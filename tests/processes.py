"""Process helpers shared by the tests that interrupt a running report."""
import psutil


def ipykernel_children(pid: int) -> list[psutil.Process]:
    """The descendants of process `pid` running ipykernel (the notebooks' kernels)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "ipykernel" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def ipykernel_child(pid: int) -> psutil.Process | None:
    """The first descendant of process `pid` running ipykernel (the notebook's kernel), or None yet."""
    return next(iter(ipykernel_children(pid)), None)
