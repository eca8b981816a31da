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
import threading
import time
from contextlib import contextmanager

import pandas as pd
import torch

from qwenlab.memory.device import NAN, cuda_sample, host_sample, is_cuda, read_hwm, reset_hwm
from qwenlab.memory.frame import turn_peaks

HOST_COLUMNS = ("rss", "uss", "host_peak_rss")
CUDA_COLUMNS = ("cuda_allocated", "cuda_reserved", "cuda_active", "cuda_inactive_split", "cuda_peak_allocated",
                "cuda_peak_reserved", "cuda_num_alloc_retries", "cuda_num_ooms", "cuda_device_used",
                "cuda_device_total")
BYTE_COLUMNS = HOST_COLUMNS + CUDA_COLUMNS
USS_MODES = ("all", "boundaries", "off")


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
        self.hwm_resettable = reset_hwm()
        self.t0 = time.perf_counter()
        if interval_s:
            self.start()

    # sampling
    def sample(self, uss: bool = True) -> dict:
        row = host_sample(uss)
        row["host_peak_rss"] = read_hwm() if self.hwm_resettable else NAN
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
            reset_hwm()

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

    # results
    def frame(self):
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
        return pd.DataFrame(self.spans, columns=None if self.spans else ["phase", "turn", "t0", "t1"])

    def turn_peaks(self):
        """Per turn: the highest peak of its phases (CUDA: allocated/reserved; host: VmHWM, else max RSS),
        and the memory left at its end."""
        return turn_peaks(self.frame())

