"""Memory tracker: samples host and CUDA allocator memory at phase boundaries (load, prefill, each decode step,
end of each turn) and optionally on a background thread; `frame()` gives one row per sample.

Columns: t (s since the tracker started), phase, event (start | end | step | tick | mark), turn, step, any
labels set on the tracker (strategy, policy...), then bytes:
  rss, uss              host resident / unique set size (psutil); uss only where `uss` asks for it (it is slow)
  host_peak_rss         VmHWM since the phase began (reset through /proc/self/clear_refs where Linux allows)
  cuda_allocated        bytes in live tensors (allocated_bytes.all.current)
  cuda_reserved         bytes the caching allocator holds from the driver (reserved_bytes.all.current)
  cuda_active           allocated + freed blocks still in use by a stream (active_bytes.all.current)
  cuda_inactive_split   freed pieces of split blocks that cannot go back to the driver (fragmentation)
  cuda_peak_allocated / cuda_peak_reserved   peaks since the phase began (reset_peak_memory_stats per phase)
  cuda_num_alloc_retries, cuda_num_ooms      counters: a retry means the allocator freed its cache and tried again
  cuda_device_used      total - free from cudaMemGetInfo: what nvidia-smi shows, CUDA context and other processes
                        included; device_used - reserved is memory outside this process's caching allocator
CPU runs leave every cuda_* column NaN.
"""
import gc
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

HOST_COLUMNS = ("rss", "uss", "host_peak_rss")
CUDA_COLUMNS = ("cuda_allocated", "cuda_reserved", "cuda_active", "cuda_inactive_split", "cuda_peak_allocated",
                "cuda_peak_reserved", "cuda_num_alloc_retries", "cuda_num_ooms", "cuda_device_used",
                "cuda_device_total")
BYTE_COLUMNS = HOST_COLUMNS + CUDA_COLUMNS
NAN = float("nan")
USS_MODES = ("all", "boundaries", "off")
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def _read_hwm() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return NAN


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def cuda_sample(device) -> dict:
    """The allocator's counters for one device (no synchronisation: they are host-side bookkeeping)."""
    s = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"cuda_allocated": s.get("allocated_bytes.all.current", 0),
            "cuda_reserved": s.get("reserved_bytes.all.current", 0),
            "cuda_active": s.get("active_bytes.all.current", 0),
            "cuda_inactive_split": s.get("inactive_split_bytes.all.current", 0),
            "cuda_peak_allocated": s.get("allocated_bytes.all.peak", 0),
            "cuda_peak_reserved": s.get("reserved_bytes.all.peak", 0),
            "cuda_num_alloc_retries": s.get("num_alloc_retries", 0),
            "cuda_num_ooms": s.get("num_ooms", 0),
            "cuda_device_used": total - free, "cuda_device_total": total}


def host_sample(uss: bool = True) -> dict:
    proc = psutil.Process()
    if uss:
        info = proc.memory_full_info()
        return {"rss": info.rss, "uss": info.uss}
    return {"rss": proc.memory_info().rss, "uss": NAN}


def settle(device):
    """What a baseline is taken after: garbage collected and, on CUDA, every kernel finished."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize(device)


class MemoryTracker:
    """`with tracker.phase("load"): ...` or begin()/end(); mark() for one sample; track_send() runs one chat turn
    with prefill / decode / turn_end phases by wrapping ChatSession.send's on_token callback.

    interval_s: also sample on a background thread every interval_s seconds (rows with event 'tick').
    uss: 'all' samples USS in every row; 'boundaries' (default) only at phase starts/ends and marks (reading
    USS walks the process's page tables: milliseconds, too slow for every decode step); 'off' never."""

    def __init__(self, device="cpu", interval_s: float | None = None, uss: str = "boundaries"):
        if uss not in USS_MODES:
            raise ValueError(f"uss={uss!r}: choose one of {', '.join(USS_MODES)}")
        self.device = torch.device(device)
        self.cuda = is_cuda(self.device)
        self.interval_s, self.uss = interval_s, uss
        self.labels: dict = {}
        self.rows: list[dict] = []
        self.spans: list[dict] = []
        self.current: tuple[str, dict] | None = None
        self._span_start = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.hwm_resettable = _reset_hwm()
        self.t0 = time.perf_counter()
        if interval_s:
            self.start()

    # sampling
    def sample(self, uss: bool = True) -> dict:
        row = host_sample(uss)
        row["host_peak_rss"] = _read_hwm() if self.hwm_resettable else NAN
        if self.cuda:
            row |= cuda_sample(self.device)
        else:
            row |= {k: NAN for k in CUDA_COLUMNS}
        return row

    def mark(self, phase: str, event: str = "mark", turn=None, step=None, **labels) -> dict:
        want_uss = self.uss == "all" or (self.uss == "boundaries" and event not in ("step", "tick"))
        row = {"t": time.perf_counter() - self.t0, "phase": phase, "event": event, "turn": turn, "step": step,
               **self.labels, **labels, **self.sample(want_uss)}
        with self._lock:
            self.rows.append(row)
        return row

    def reset_peaks(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.hwm_resettable:
            _reset_hwm()

    def begin(self, phase: str, turn=None, **labels):
        """Starts a phase: resets the peak counters so the phase's end row carries the phase's own peak."""
        if self.current is not None:
            self.end()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.reset_peaks()
        self.current = (phase, {"turn": turn, **labels})
        row = self.mark(phase, "start", turn=turn, **labels)
        self._span_start = row["t"]

    def end(self, step=None) -> dict | None:
        if self.current is None:
            return None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        phase, labels = self.current
        row = self.mark(phase, "end", step=step, **labels)
        self.spans.append({"phase": phase, "turn": labels.get("turn"), "t0": self._span_start, "t1": row["t"],
                           **{k: v for k, v in labels.items() if k != "turn"}, **self.labels})
        self.current = None
        return row

    @contextmanager
    def phase(self, name: str, turn=None, **labels):
        self.begin(name, turn=turn, **labels)
        try:
            yield self
        finally:
            self.end()

    # background sampling
    def _loop(self):
        while not self._stop.wait(self.interval_s):
            phase, labels = self.current or ("idle", {})
            self.mark(phase, "tick", **labels)

    def start(self):
        if self._thread is None and self.interval_s:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="qwenlab-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.end()

    @contextmanager
    def labelled(self, **labels):
        """Adds labels (columns) to every row sampled inside the block."""
        old = self.labels
        self.labels = {**old, **labels}
        try:
            yield self
        finally:
            self.labels = old

    # hooks into generation
    def on_token(self, turn=None, step_samples: bool = True, callback=None):
        """An on_token callback for decode.generate / ChatSession.send: the first token closes the prefill phase
        and opens decode; later tokens add one 'step' row each (each after the forward of the previous token)."""
        count = [0]

        def hook(token):
            count[0] += 1
            if count[0] == 1:
                self.end(step=0)
                self.begin("decode", turn=turn)
            elif step_samples:
                self.mark("decode", "step", turn=turn, step=count[0] - 1)
            if callback is not None:
                callback(token)

        hook.count = count
        return hook

    def track_send(self, session, user: str, params, turn=None, *, step_samples: bool = True, after_turn=None,
                   on_token=None, should_stop=None):
        """session.send(user, params) with phases prefill, decode, turn_end. after_turn() runs before the
        turn_end sample (a policy such as emptying the allocator cache)."""
        self.begin("prefill", turn=turn)
        hook = self.on_token(turn, step_samples, on_token)
        try:
            result = session.send(user, params, on_token=hook, should_stop=should_stop)
        finally:
            self.end(step=hook.count[0])
        if after_turn is not None:
            after_turn()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.mark("turn_end", "mark", turn=turn)
        return result

    def track_generate(self, model, prompt_ids, params, turn=None, *, step_samples: bool = True, **kwargs):
        from .decode import generate

        self.begin("prefill", turn=turn)
        hook = self.on_token(turn, step_samples, kwargs.pop("on_token", None))
        try:
            return generate(model, prompt_ids, params, on_token=hook, **kwargs)
        finally:
            self.end(step=hook.count[0])

    # results
    def frame(self):
        import pandas as pd

        with self._lock:
            rows = list(self.rows)
        columns = ["t", "phase", "event", "turn", "step"]
        frame = pd.DataFrame(rows)
        for c in columns + list(BYTE_COLUMNS):
            if c not in frame:
                frame[c] = NAN if c in BYTE_COLUMNS or c == "t" else None
        extra = [c for c in frame.columns if c not in columns and c not in BYTE_COLUMNS]
        frame = frame[columns + extra + list(BYTE_COLUMNS)]
        frame[list(BYTE_COLUMNS)] = frame[list(BYTE_COLUMNS)].astype("float64")
        return frame

    def spans_frame(self):
        import pandas as pd

        return pd.DataFrame(self.spans, columns=None if self.spans else ["phase", "turn", "t0", "t1"])

    def turn_peaks(self):
        """Per turn: the highest peak of its phases (CUDA: allocated/reserved; host: VmHWM, else max RSS),
        and the memory left at its end."""
        return turn_peaks(self.frame())


def turn_peaks(frame):
    import pandas as pd

    f = frame[frame["turn"].notna()]
    if f.empty:
        return pd.DataFrame()
    host_peak = f["host_peak_rss"].where(f["host_peak_rss"].notna(), f["rss"])
    f = f.assign(host_peak=host_peak)
    g = f.groupby("turn", sort=True)
    out = pd.DataFrame({"peak_rss": g["host_peak"].max(), "peak_cuda_allocated": g["cuda_peak_allocated"].max(),
                        "peak_cuda_reserved": g["cuda_peak_reserved"].max()})
    end = f[f["phase"] == "turn_end"].groupby("turn").last()
    for c in ("rss", "uss", "cuda_allocated", "cuda_reserved", "cuda_device_used"):
        out[f"end_{c}"] = end[c] if c in end else NAN
    t0, t1 = g["t"].min(), g["t"].max()
    out["t_start"], out["t_end"] = t0, t1
    return out.reset_index()


# policies
def empty_cache(device) -> bool:
    """torch.cuda.empty_cache(): hands the allocator's unused cached blocks back to the driver. Returns whether
    anything could be done: on CPU nothing (the host allocator is glibc malloc, not torch's caching allocator)."""
    if is_cuda(device):
        torch.cuda.empty_cache()
        return True
    return False


def allocator_config(expandable_segments: bool) -> str:
    """The PYTORCH_CUDA_ALLOC_CONF value for the policy (any other options already set are kept)."""
    parts = [p for p in os.environ.get(ALLOC_CONF_ENV, "").split(",") if p and not p.startswith("expandable_segments")]
    return ",".join(parts + [f"expandable_segments:{'True' if expandable_segments else 'False'}"])


def apply_allocator_config(expandable_segments: bool | None) -> str:
    """Sets PYTORCH_CUDA_ALLOC_CONF for this process. Honoured only when CUDA has not initialised yet, so in
    practice only in a fresh process (qwenlab stress --fresh-process passes it to each child). Returns one of
    'default' (None asked), 'set', 'already' (the running allocator has it), 'not honoured (CUDA already
    initialised)', 'n/a (no CUDA)'."""
    if expandable_segments is None:
        return "default"
    if not torch.cuda.is_available():
        return "n/a (no CUDA)"
    want = allocator_config(expandable_segments)
    if torch.cuda.is_initialized():
        return "already" if os.environ.get(ALLOC_CONF_ENV, "") == want else "not honoured (CUDA already initialised)"
    os.environ[ALLOC_CONF_ENV] = want
    return "set"


@contextmanager
def record_history(path, max_entries: int = 20_000, stacks: str = "python", device=None):
    """Records the last max_entries CUDA allocator events with their stacks ('python' keeps the pickle small and
    the dump fast; 'all' adds C++ frames) while the block runs, then writes a snapshot pickle to open at
    https://pytorch.org/memory_viz. On CPU it records nothing and says so. Yields the path (None on CPU)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        print("record_history: CUDA is not available, no allocator history to record (CPU run)")
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks=stacks)
    try:
        yield path
    finally:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)


# reading the frame
def unit_for(max_bytes: float) -> tuple[float, str]:
    return (2 ** 30, "GiB") if max_bytes >= 4 * 2 ** 30 else (2 ** 20, "MiB")


def has_cuda_columns(frame) -> bool:
    return bool(frame["cuda_allocated"].notna().any())


def phase_delta(frame, phase: str, column: str) -> float:
    """column at the end of the (first) phase minus at its start: e.g. the bytes the load left resident."""
    rows = frame[frame["phase"] == phase]
    start, end = rows[rows["event"] == "start"], rows[rows["event"] == "end"]
    if start.empty or end.empty:
        return NAN
    return float(end[column].iloc[0] - start[column].iloc[0])


def fragmentation(frame):
    """reserved - allocated (cached but unused) and inactive split bytes per sample; empty on CPU."""
    if not has_cuda_columns(frame):
        return frame.iloc[0:0][["t", "phase"]]
    return frame.assign(cached_unused=frame["cuda_reserved"] - frame["cuda_allocated"])[
        ["t", "phase", "event", "turn", "step", "cached_unused", "cuda_inactive_split"]]


SHADES = {"load": "0.6", "prefill": "tab:orange", "decode": "tab:blue"}


def plot_timeline(frame, spans, title: str = ""):
    """Allocated vs reserved (and device used) on CUDA, RSS/USS on CPU, phases shaded, each turn's peak marked."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cuda = has_cuda_columns(frame)
    cols = (("cuda_allocated", "allocated"), ("cuda_reserved", "reserved"),
            ("cuda_device_used", "device used (nvidia-smi)")) if cuda else (("rss", "RSS"), ("uss", "USS"))
    div, unit = unit_for(max(frame[c].max() for c, _ in cols))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for s in spans.itertuples():
        ax.axvspan(s.t0, s.t1, color=SHADES.get(s.phase, "0.9"), alpha=0.15, lw=0)
    for c, label in cols:
        f = frame[frame[c].notna()]
        ax.plot(f["t"], f[c] / div, label=label, marker="." if c == "uss" else None, lw=1.2)
    peaks = turn_peaks(frame)
    if not peaks.empty:
        key = "peak_cuda_allocated" if cuda else "peak_rss"
        ax.scatter(peaks["t_end"], peaks[key] / div, marker="v", color="crimson", zorder=3,
                   label="turn peak (allocated)" if cuda else "turn peak (VmHWM)")
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=SHADES[p], alpha=0.3, label=p) for p in SHADES if p in set(spans.get("phase", []))]
    ax.legend(handles=handles, fontsize=7, loc="lower right", ncol=2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(unit)
    ax.set_title(title or ("CUDA allocator: allocated vs reserved" if cuda else
                           "host memory (CPU run: RSS / USS, no CUDA allocator)"), fontsize=9)
    fig.tight_layout()
    return fig


def plot_fragmentation(frame, title: str = ""):
    """reserved - allocated and inactive split bytes over time (CUDA only; None on CPU)."""
    import matplotlib.pyplot as plt

    frag = fragmentation(frame)
    if frag.empty:
        return None
    div, unit = unit_for(frag["cached_unused"].max())
    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.plot(frag["t"], frag["cached_unused"] / div, label="reserved - allocated (cached, unused)")
    ax.plot(frag["t"], frag["cuda_inactive_split"] / div, label="inactive split (fragments)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(unit)
    ax.legend(fontsize=7)
    ax.set_title(title or "what the caching allocator holds beyond live tensors", fontsize=9)
    fig.tight_layout()
    return fig
