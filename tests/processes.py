"""Process helpers shared by the tests that interrupt a running report."""
import psutil


def ipykernel_child(pid: int) -> psutil.Process | None:
    """The first descendant of process `pid` running ipykernel (the notebook's kernel), or None yet."""
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "ipykernel" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None
