"""Running one notebook for `qwenlab report`: papermill on this environment's `qwenlab` Jupyter kernel, in the repo
root, figures inline, the kernel's own stderr in the run's logs/.

Each notebook's kernel can be started while the notebook before it runs (NextKernel): the kernel process comes up
and imports what every notebook imports (WARM_UP: torch, numpy, pandas, matplotlib, qwenlab; into sys.modules, no
name bound in the notebook, CUDA untouched) beside the running notebook, so the next one starts at its first cell.

The kernelspec is looked up in sys.prefix only (share/jupyter/kernels/qwenlab, installed there when missing), never
in the per-user or system folders, where another environment's spec of the same name could sit; its python must be
the one running the report."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from qwenlab.errors import QwenlabError
from qwenlab.paths import REPO_ROOT

KERNEL = "qwenlab"
_launched: list = []  # the kernel managers started for the notebooks now running and the next ones
_launched_lock = threading.Lock()
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")  # torch's CPU ops, tokenizers'


def thread_limits(jobs: int) -> dict:
    """The environment of each of `jobs` kernels running at once: the CPU cores shared out between them. Every
    torch process would otherwise run one OpenMP thread per core, and OpenMP threads that outnumber the cores spin
    on each other: with 3 notebooks on 16 cores, CPU-side diffs took 10-16x longer (doc/performance.md). A variable
    the caller set is kept."""
    if jobs <= 1:
        return {}
    share = str(max(1, (os.cpu_count() or 1) // jobs))
    return {name: share for name in THREAD_VARIABLES if name not in os.environ}


# What a notebook's kernel imports before its first cell when it is started ahead (NextKernel): the modules every
# notebook imports and that read nothing from the notebook's parameters or environment (transformers is imported
# later, by qwenlab, after HF_HUB_OFFLINE is set). Silent: no output, no execution count.
WARM_UP = ("import importlib as _qwenlab_importlib\n"
           "for _qwenlab_module in ('torch', 'numpy', 'pandas', 'matplotlib.pyplot', 'qwenlab'):\n"
           "    _qwenlab_importlib.import_module(_qwenlab_module)\n"
           "del _qwenlab_importlib, _qwenlab_module\n")


def kernels_dir() -> Path:
    """This environment's Jupyter kernelspecs (where `ipykernel install --sys-prefix` puts them)."""
    return Path(sys.prefix) / "share" / "jupyter" / "kernels"


def tracked_kernel_manager():
    """The kernel manager class of every notebook's kernel (NextKernel; papermill is handed the instance):
    kernelspecs from kernels_dir() only, and each instance remembered so an interrupted report can stop its kernel."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, *args, **kwargs):
            specs = KernelSpecManager(kernel_dirs=[str(kernels_dir())], ensure_native_kernel=False)
            super().__init__(*args, kernel_spec_manager=specs, **kwargs)
            with _launched_lock:
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
    """Kill what is left of the kernel processes started for the running notebooks and the next ones (each in its
    own session: the group)."""
    with _launched_lock:
        managers = list(_launched)
        _launched.clear()
    for km in managers:
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


def same_interpreter(a: str, b: str) -> bool:
    """Two paths that start the same Python environment: the same file, or links to one binary side by side
    (a venv's bin/python and bin/python3). Links are not followed further: a venv's python is a link to the base
    interpreter, but started through the venv's path it runs the venv."""
    a, b = os.path.abspath(a), os.path.abspath(b)
    return a == b or (os.path.dirname(a) == os.path.dirname(b) and os.path.realpath(a) == os.path.realpath(b))


def install_kernel(name: str):
    from ipykernel.kernelspec import install

    print(f"installing Jupyter kernel {name!r} for {sys.executable} into {kernels_dir()}", file=sys.stderr)
    try:
        install(kernel_name=name, display_name=f"{name} (Python 3)", prefix=sys.prefix)
    except OSError as e:
        raise QwenlabError(f"cannot install the {name!r} Jupyter kernel into {kernels_dir()} ({e.strerror or e}); "
                           "run the report from a virtual environment you can write to") from None


def ensure_kernel(name: str = KERNEL) -> dict:
    """This environment's `name` kernelspec, installed when missing; QwenlabError (before anything is written)
    when it cannot start or would run another Python. -> {"name", "spec", "argv"} for the run header."""
    spec = kernels_dir() / name / "kernel.json"
    if not spec.is_file():
        install_kernel(name)
    try:
        argv = json.loads(spec.read_text())["argv"]
        python = str(argv[0])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise QwenlabError(f"kernelspec {name} ({spec}): not a readable kernelspec ({e}); reinstall it: "
                           f"{sys.executable} -m ipykernel install --sys-prefix --name {name}") from None
    found = python if os.path.isabs(python) else shutil.which(python)
    if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise QwenlabError(f"kernelspec {name} ({spec}) cannot start: its argv[0] {python} does not exist; "
                           f"reinstall it: {sys.executable} -m ipykernel install --sys-prefix --name {name}")
    if not same_interpreter(found, sys.executable):
        raise QwenlabError(f"kernelspec {name} ({spec}) runs {python}, not this command's {sys.executable}; "
                           f"reinstall it: {sys.executable} -m ipykernel install --sys-prefix --name {name}")
    return {"name": name, "spec": str(spec), "argv": argv}


def _not_checked_twice(record) -> bool:
    """papermill re-inspects parameters with a parser that skips lines holding a second '=' and then warns about
    names it missed; the report has already checked them (declared_parameters), so those warnings are noise."""
    message = record.getMessage()
    return not message.startswith(("Passed unknown parameter", "Unable to parse line"))


@contextmanager
def kernel_environment(quiet: threading.Event | None = None):
    """The kernel inherits this process's environment: no MPLBACKEND, so figures land inline. Once `quiet` is set
    (the report is stopping and has killed the kernels), papermill's and nbclient's complaints about the dead
    kernels are dropped."""
    import logging

    def relevant(record) -> bool:
        return (quiet is None or not quiet.is_set()) and _not_checked_twice(record)

    saved = os.environ.pop("MPLBACKEND", None)
    logger = logging.getLogger("papermill")
    logger.addFilter(relevant)
    try:
        yield
    finally:
        logger.removeFilter(relevant)
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


class NextKernel:
    """A notebook's kernel started ahead, while the notebook before it runs: start(log) launches the process (its
    stderr into `log`, logs/NN_name.kernel.log) and sends WARM_UP, which the kernel runs while the
    report waits on the current notebook; take() hands the manager to execute(), whose papermill connects its own
    client (its first request queues behind the warm-up). Every started kernel is in _launched until shut down.
    Every notebook runs on a kernel started here, so the report alone decides where each kernel's stderr goes."""

    ATTEMPTS = 2

    def __init__(self):
        self.km = None
        self.error = None  # why no kernel started: the notebook's error entry ({ename, evalue, ...})
        self._client = None
        self._stderr = None

    def start(self, log: Path, warm_up: bool = True, env: dict | None = None):
        """Launch it, its stderr into `log`, with this process's environment updated by `env`, and send WARM_UP
        (warm_up). A launch that fails is tried once more; if that fails too, `error` says why (also written to
        `log`) and the notebook is reported as errored without running."""
        from jupyter_core.utils import run_sync

        self._stderr = open(log, "ab")
        for attempt in range(1, self.ATTEMPTS + 1):
            try:
                km = tracked_kernel_manager()(kernel_name=KERNEL)
                self.km = km
                run_sync(km.start_kernel)(cwd=str(REPO_ROOT), stderr=self._stderr,
                                          env={**os.environ, **(env or {})})
                self._client = km.client()
                self._client.start_channels(hb=False)  # a heartbeat thread stopped as it starts spins
                if warm_up:
                    self._client.execute(WARM_UP, silent=True, store_history=False)
                self.error = None
                return
            except Exception as e:
                text = (str(e).strip().splitlines() or [""])[0]
                self.error = {"ename": "KernelStartError", "evalue": f"the {KERNEL!r} Jupyter kernel did not start "
                              f"({type(e).__name__}: {text})", "cell_index": None, "exec_count": None}
                self._stderr.write(f"qwenlab report: kernel start {attempt} of {self.ATTEMPTS} failed: "
                                   f"{type(e).__name__}: {e}\n".encode())
                self._stderr.flush()
                km, self.km = self.km, None
                self._close_client()
                if km is not None:
                    shutdown(km)

    def take(self):
        """The started kernel's manager (None when none was started); its warm-up client closed."""
        km, self.km = self.km, None
        self.close()
        return km

    def discard(self):
        """Stop the started kernel, if any: its notebook will not run on it."""
        km = self.take()
        if km is not None:
            shutdown(km)

    def close(self):
        self._close_client()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _close_client(self):
        if self._client is not None:
            self._client.stop_channels()
            self._client = None


def shutdown(km):
    """Stop a kernel papermill ran on without owning it (one started ahead), and forget it."""
    from jupyter_core.utils import run_sync

    try:
        if run_sync(km.is_alive)():
            run_sync(km.shutdown_kernel)(now=False)
    except RuntimeError:  # "No kernel is running!": it died on its own
        pass
    finally:
        run_sync(km.cleanup_resources)()
        with _launched_lock:
            if km in _launched:
                _launched.remove(km)


def execute(notebook: Path, output: Path, params: dict, timeout: float | None, log: Path, km) -> dict | None:
    """Run one notebook on km, the kernel started for it (NextKernel.take()), shut down here when the notebook ends;
    None when it ran through, else {ename, evalue, cell_index, exec_count} of what stopped it. Its log is created
    first: report/interrupt.py reads an existing log as 'this notebook had started'."""
    log.touch()
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=params, kernel_name=KERNEL,
                                   cwd=str(REPO_ROOT), progress_bar=False, request_save_on_cell_execute=True,
                                   execution_timeout=timeout, km=km)
    except PapermillExecutionError as e:
        return {"ename": e.ename, "evalue": e.evalue, "cell_index": e.cell_index, "exec_count": e.exec_count}
    except Exception as e:  # kernel died, cell timeout: the notebook errored
        text = str(e).strip()
        return {"ename": type(e).__name__, "evalue": text.splitlines()[0] if text else "", "cell_index": None,
                "exec_count": None}
    finally:
        shutdown(km)
    return None


def environment_mismatch(kernel: dict | None, own: dict) -> str | None:
    """What differs between the environment a notebook measured in its kernel (qwenlab.versions.environment, in its
    metrics) and the report's own; None when they agree."""
    if not isinstance(kernel, dict):
        return "the notebook's metrics do not say which Python ran it (write them with qwenlab.checks.nbutil)"
    differences = []
    if not same_interpreter(str(kernel.get("executable")), own["executable"]):
        differences.append(f"python {kernel.get('executable')} (this command: {own['executable']})")
    for key in ("python", "qwenlab_path", "qwenlab", "torch", "transformers"):
        if kernel.get(key) != own.get(key):
            differences.append(f"{key} {kernel.get(key)} (this command: {own.get(key)})")
    return "the kernel ran " + "; ".join(differences) if differences else None
