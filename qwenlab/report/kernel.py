"""Running one notebook for `qwenlab report`: papermill on the `qwenlab` Jupyter kernel (installed when missing),
in the repo root, figures inline, the kernel's own stderr in the run's logs/."""
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.paths import REPO_ROOT

KERNEL = "qwenlab"
_launched: list = []  # the kernel managers papermill created for the notebook now running


def tracked_kernel_manager():
    """papermill's kernel manager class, remembering each instance so an interrupted report can stop its kernel."""
    from jupyter_client.manager import AsyncKernelManager

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _launched.append(self)

    return TrackedKernelManager


def quiet_abandoned_tasks(log: Path):
    """After an interrupt, the cell's coroutine nbclient left behind ends later (DeadKernelError) or is destroyed
    pending, and asyncio would print that with a traceback at exit: it goes to the notebook's log instead."""
    from jupyter_core.utils import ensure_event_loop

    def to_log(loop, context):
        with open(log, "a") as f:
            f.write(f"after the interrupt: {context.get('message')} {context.get('exception')!r}\n")

    ensure_event_loop().set_exception_handler(to_log)


def stop_kernels(timeout: float = 10.0):
    """Kill what is left of the kernel processes started for the running notebook (their own session: the group)."""
    for km in _launched:
        process = getattr(km.provisioner, "process", None) if km.provisioner is not None else None
        if process is None or process.poll() is not None:
            continue
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            process.kill()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _launched.clear()


def ensure_kernel(name: str = KERNEL):
    """Install the `qwenlab` kernel for this Python when missing, so a fresh machine needs no set-up."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
        return
    except NoSuchKernel:
        pass
    print(f"installing Jupyter kernel {name!r} for {sys.executable}", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", name,
                           "--display-name", f"{name} (Python 3)"], capture_output=True, text=True)
    if done.returncode != 0:
        raise QwenlabError(f"could not install the {name!r} Jupyter kernel: {done.stderr.strip().splitlines()[-1:]}")


def _not_checked_twice(record) -> bool:
    """papermill re-inspects parameters with a parser that skips lines holding a second '=' and then warns about
    names it missed; the report has already checked them (declared_parameters), so those warnings are noise."""
    message = record.getMessage()
    return not message.startswith(("Passed unknown parameter", "Unable to parse line"))


@contextmanager
def kernel_environment():
    """The kernel inherits this process's environment: no MPLBACKEND, so figures land inline."""
    import logging

    saved = os.environ.pop("MPLBACKEND", None)
    logger = logging.getLogger("papermill")
    logger.addFilter(_not_checked_twice)
    try:
        yield
    finally:
        logger.removeFilter(_not_checked_twice)
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


@contextmanager
def kernel_stderr_to(log: Path):
    """The kernel process writes its own chatter (ZMQ warnings, shutdown notices) to the inherited fd 2: keep it
    in the run's logs/ so the progress lines stay readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def execute(notebook: Path, output: Path, params: dict, timeout: float | None, log: Path) -> dict | None:
    """Run one notebook; None when it ran through, else {ename, evalue, cell_index, exec_count} of what stopped it.
    Its log is created first: report/interrupt.py reads an existing log as 'this notebook had started'."""
    log.touch()
    import papermill
    from papermill.exceptions import PapermillExecutionError

    _launched.clear()
    try:
        with kernel_stderr_to(log):
            papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=KERNEL,
                                       cwd=str(REPO_ROOT), progress_bar=False, request_save_on_cell_execute=True,
                                       execution_timeout=timeout, kernel_manager_class=tracked_kernel_manager())
    except KeyboardInterrupt:  # SIGINT/SIGTERM (report/interrupt.py): nbclient's shutdown ran; make sure it took
        stop_kernels()
        quiet_abandoned_tasks(log)
        raise
    except PapermillExecutionError as e:
        return {"ename": e.ename, "evalue": e.evalue, "cell_index": e.cell_index, "exec_count": e.exec_count}
    except Exception as e:  # kernel died, cell timeout, kernel failed to start: the notebook errored
        text = str(e).strip()
        return {"ename": type(e).__name__, "evalue": text.splitlines()[0] if text else "", "cell_index": None,
                "exec_count": None}
    return None
