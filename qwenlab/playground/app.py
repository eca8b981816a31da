"""Prompt playground: ipywidgets front end over decode/chat, with streaming, Stop, per-token table, reference
comparison and layer inspection. Work runs in one background thread so the kernel stays responsive.

Headless use (tests, the notebook's demo): set widget values, `pg.generate_button.click()`, `pg.wait()`,
then read `pg.result`, `pg.output_text`, `pg.status`, `pg.readouts`, `pg.token_table`.
"""
from __future__ import annotations

import html
import json
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from qwenlab.activations.nvfp4_reference import load_reference_for
from qwenlab.atomic import json_safe
from qwenlab.errors import QwenlabError
from qwenlab.generation.chat import ChatSession
from qwenlab.generation.decode import check_context, generate
from qwenlab.generation.engine import Engine
from qwenlab.model.dtypes import dtype_name
from qwenlab.model.loader import load
from qwenlab.model.spec import LoadSpec
from qwenlab.model.tiny import resolve_model_dir
from qwenlab.paths import resolve_out_dir
from qwenlab.playground import compare, core
from qwenlab.playground.widgets import PlaygroundWidgets
from qwenlab.versions import package_versions

TABLE_REFRESH_S = 1.0


class Playground(PlaygroundWidgets):
    def __init__(self, model_dir=None, device=None, dtype=None, out_dir=None, *, checkpoint=None,
                 reference_model=None, preload: bool = False, compare_max_new_tokens: int = 64,
                 refresh_s: float = 0.05, quant: str | None = None, device_map=None):
        """model_dir None/"" = the embedded tiny model; `checkpoint` (a loader.Checkpoint) and `reference_model`
        reuse models already loaded elsewhere instead of loading on first use. quant: the quantization dropdown's
        first value (nvfp4, nvfp4-w4a4; a `checkpoint` given must have been loaded with it); changing the
        dropdown reloads the model (and its reference) at the next job."""
        self.model_dir, self.device, self.dtype = model_dir or None, device or None, dtype or None
        self.out_dir = out_dir
        self.compare_max_new_tokens, self.refresh_s = compare_max_new_tokens, refresh_s
        self._given_checkpoint, self.reference_model = checkpoint, reference_model
        self.ckpt = self.session = None
        self.result = self.settings_used = self.comparison = self.layer_diff = self.layer_figure = None
        self.history: list[dict] = []
        self.output_text, self.last_error, self._status_text, self.readouts = "", None, "", {}
        self._recorder, self._history_before, self._job, self.engine = None, [], "", None
        self._stop, self._load_lock, self._worker = threading.Event(), threading.Lock(), None
        self._build_widgets()
        self.device_map = device_map  # qwenlab's layers across devices (doc/placement.md)
        self.quantization.value = quant if quant in core.QUANTIZATIONS else "none"
        self._given_quant = self._ckpt_quant = core.quant_arg(self.quantization.value)
        self._set_status("ready: type a prompt and press Generate (the model loads on first use)")
        if preload:
            self._start("load", self._ensure_model)

    # ---- public API ----------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status_text

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def token_table(self):
        tok = self.ckpt.tokenizer if self.ckpt else None
        return core.token_frame(list(self._recorder.rows) if self._recorder else [], tok)

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the running job (generate, compare, inspect, load); True when nothing is running anymore."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        return not self.busy

    def current_settings(self) -> core.Settings:
        return core.Settings(input_mode=self.input_mode.value, prompt=self.prompt.value, system=self.system.value,
                             thinking=bool(self.thinking.value), temperature=float(self.temperature.value),
                             top_k=int(self.top_k.value), top_p=float(self.top_p.value), seed=int(self.seed.value),
                             max_new_tokens=int(self.max_new_tokens.value), decode_mode=self.decode_mode.value,
                             quantization=self.quantization.value)

    def check_against_generate(self) -> dict:
        """Re-runs the last generation through the decode API directly (same settings, own prompt rendering)."""
        if self.result is None or self.ckpt is None:
            raise QwenlabError("nothing generated yet")
        direct = core.direct_generation(self.ckpt.model, self.ckpt.tokenizer, self.settings_used,
                                        self._history_before)
        return {"text_equal": direct.text == self.output_text, "ids_equal": direct.ids == self.result.ids,
                "prompt_ids_equal": direct.prompt_ids == self.result.prompt_ids, "direct_text": direct.text,
                "direct_stop_reason": direct.stop_reason, "direct": direct}

    def export_json(self) -> dict:
        ckpt = self.ckpt
        model = None if ckpt is None else {
            "path": str(ckpt.path), "name": ckpt.name, "config_hash": ckpt.config.config_hash(),
            "dtype": dtype_name(ckpt.model.dtype), "device": str(ckpt.model.device),
            "num_hidden_layers": ckpt.config.num_hidden_layers}

        return {"kind": "qwenlab.playground.app", "version": 1,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": model, "settings": self.current_settings().to_json(),
                "conversation": list(self.session.messages) if self.session else [],
                "generations": list(self.history),
                "comparison": self.comparison.to_json() if self.comparison else None,
                "layer_diff": None if self.layer_diff is None else {
                    "first_divergence": self.layer_diff.first_divergence, "passed": self.layer_diff.passed,
                    "dtype": self.layer_diff.dtype},
                "versions": package_versions()}

    def save_json(self, path=None) -> Path:
        if path is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            path = resolve_out_dir(self.out_dir) / "reports" / f"playground_{stamp}.json"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(self.export_json()), indent=2, ensure_ascii=False))
        return path

    # ---- button handlers (kernel thread) -------------------------------------------------------------------
    def _on_generate(self, _=None):
        try:
            settings = self.current_settings()
            settings.validate()
        except QwenlabError as e:
            self._set_status(str(e), "error")
            return
        self._start("generate", lambda: self._generate_job(settings))

    def _on_stop(self, _=None):
        if self.busy:
            self._stop.set()
            self._set_status(f"stopping {self._job} …", "warn")
        else:
            self._set_status("nothing is running", "info")

    def _on_reset(self, _=None):
        if self.busy:
            self._stop.set()
            self.wait(30)
        self.session, self._history_before, self.output_text = None, [], ""
        self.output_html.value = self._output_html()
        self._set_status("chat reset: the next Generate starts a new conversation", "ok")

    def _on_compare(self, _=None):
        self._start("compare", self._compare_job)

    def _on_inspect(self, _=None):
        self._start("inspect", self._inspect_job)

    def _on_export(self, _=None):
        try:
            path = self.save_json()
        except Exception as e:  # a full disk or a read-only folder must not take the kernel down
            self._set_status(f"export failed: {type(e).__name__}: {e}", "error")
            return
        self.export_html.value = f"exported conversation and settings to <code>{html.escape(str(path))}</code>"
        self._set_status(f"exported to {path}", "ok")

    # ---- background jobs -----------------------------------------------------------------------------------
    def _start(self, name, fn) -> bool:
        if self.busy and self._job != "load":  # a job started during the preload waits for it on the lock
            self._set_status(f"busy: {self._job} is running (press Stop or wait)", "warn")
            return False
        self._stop.clear()
        self._job = name
        self._set_busy(True)
        self._worker = threading.Thread(target=self._run_job, args=(fn,), name=f"qwenlab-playground-{name}",
                                        daemon=True)
        self._worker.start()
        return True

    def _run_job(self, fn):
        try:
            fn()
        except QwenlabError as e:
            self._set_status(str(e), "error")
        except Exception as e:  # shown in the widget, never raised into the kernel
            self.last_error = traceback.format_exc()
            self._set_status(f"internal error: {type(e).__name__}: {e} (traceback in pg.last_error)", "error")
        finally:
            if threading.current_thread() is self._worker:
                self._set_busy(False)

    def _ensure_model(self):
        with self._load_lock:
            quant = core.quant_arg(self.quantization.value)
            if self.ckpt is not None and quant == self._ckpt_quant:
                return self.ckpt
            if self.ckpt is not None:  # the quantization changed: a new model, chat cache and reference
                self.ckpt = self.session = self.reference_model = self.engine = None
            self._ckpt_quant = quant
            if self._given_checkpoint is not None and quant == self._given_quant:
                return self._use_checkpoint(self._given_checkpoint)
            self._set_status(f"loading model {self.model_dir or '(embedded tiny-qwen3)'} …", "info")
            try:
                given = self._given_checkpoint
                path = given.path if given is not None and not self.model_dir else resolve_model_dir(self.model_dir)
                ckpt = load(LoadSpec(path, self.dtype, self.device, quant, device_map=self.device_map))
            except QwenlabError as e:
                raise QwenlabError(f"model failed to load: {e}") from None
            except Exception as e:
                raise QwenlabError(f"model failed to load from {self.model_dir}: {type(e).__name__}: {e}") from None
            self._use_checkpoint(ckpt)
            self._set_status("model loaded", "ok")
            return ckpt

    def _use_checkpoint(self, ckpt):
        self._recorder = core.TokenRecorder()
        self.engine = Engine(ckpt.model, "auto")  # the graph engine on a GPU: compiled once, kept for every job
        self.ckpt = ckpt
        self.header.value = self._header_html()
        return ckpt

    def _ensure_reference(self, ckpt):
        if self.reference_model is None:
            self._set_status("loading the reference (HF transformers, eager) …", "info")
            try:
                self.reference_model = load_reference_for(ckpt, "quantized")
            except QwenlabError as e:
                raise QwenlabError(f"reference failed to load: {e}") from None
        return self.reference_model

    def _chat_session(self, ckpt, s: core.Settings) -> ChatSession:
        strategy = "session" if s.decode_mode == "kv" else "replay"
        system = s.system if s.system.strip() else None
        if self.session is None:
            self.session = ChatSession(ckpt.model, ckpt.tokenizer, system=system, enable_thinking=s.thinking,
                                       strategy=strategy, engine=self.engine)
            return self.session
        session = self.session
        session.enable_thinking = s.thinking
        if session.strategy != strategy:
            session.strategy, session.cache, session.cached_ids = strategy, None, []
        if system != session.system:  # the session re-prefills from the first changed token on
            session.system = system
            head = [{"role": "system", "content": system}] if system else []
            session.messages = head + [m for m in session.messages if m["role"] != "system"]
        return session

    def _generate_job(self, s: core.Settings):
        ckpt = self._ensure_model()
        tok, rec = ckpt.tokenizer, self._recorder
        rec.reset()
        stream, stop_ids = tok.stream(), set(tok.stop_ids)
        self.output_text, self.result, self.settings_used = "", None, s
        params = s.sampling_params()
        session = self._chat_session(ckpt, s) if s.input_mode == "chat" else None
        self._history_before = list(session.messages) if session else []
        live = {"n": 0, "t0": time.perf_counter(), "first": None, "shown": 0.0, "table": 0.0}

        def on_token(token):
            rec.on_token(token)
            now = time.perf_counter()
            live["n"] += 1
            live["first"] = live["first"] or now
            if token not in stop_ids:
                self.output_text += stream.push(token)
            if now - live["shown"] >= self.refresh_s:
                live["shown"] = now
                tok_s = (live["n"] - 1) / (now - live["first"]) if now > live["first"] else 0.0
                self._show_live(s, live["n"], tok_s, now - live["t0"], "")
            if now - live["table"] >= TABLE_REFRESH_S:
                live["table"] = now
                self.table_html.value = core.token_table_html(self.token_table)

        self.tabs.selected_index = 0
        self._set_status("generating … (Stop ends it)", "info")
        extra = {}
        if session is not None:
            turn = session.send(s.prompt, params, on_token=on_token, on_logits=rec.on_logits,
                                should_stop=self._stop.is_set)
            gen, extra = turn.generation, {"reused_tokens": turn.reused_tokens, "prefill_tokens": turn.prefill_tokens}
        else:
            ids = tok.encode(s.prompt)
            check_context(ckpt.model, len(ids))
            gen = generate(ckpt.model, ids, params, mode=s.decode_mode, engine=self.engine, on_token=on_token,
                           on_logits=rec.on_logits, should_stop=self._stop.is_set, tokenizer=tok)
        self.output_text += stream.flush()
        elapsed = time.perf_counter() - live["t0"]
        self.result = gen
        self.history.append({"input_mode": s.input_mode, "prompt": s.prompt, "settings": s.to_json(),
                             "output_text": self.output_text, "tokens": len(gen.ids), "elapsed_s": elapsed,
                             **extra, **gen.to_json()})
        self._show_live(s, len(gen.ids), gen.decode_tok_s, elapsed, gen.stop_reason, gen.prefill_s, gen.engine,
                        gen.engine_note)
        self.table_html.value = core.token_table_html(self.token_table)
        level = "warn" if gen.stop_reason == "stopped" else "ok"
        self._set_status(f"done: {len(gen.ids)} tokens, stop reason {gen.stop_reason}", level)

    def _prompt_ids_now(self, s: core.Settings) -> list[int]:
        """The last generation's prompt while the prompt box still holds it, else the box's current prompt."""
        if self.result is not None and self.settings_used is not None and self.settings_used.prompt == s.prompt:
            return list(self.result.prompt_ids)
        if not s.prompt.strip():
            raise QwenlabError("the prompt is empty: type something (or Generate first) to compare on")
        history = self.session.messages if (self.session and s.input_mode == "chat") else []
        return core.prompt_ids(s, self.ckpt.tokenizer, history)

    def _compare_job(self):
        ckpt = self._ensure_model()
        s = self.current_settings()
        ids = self._prompt_ids_now(s)
        reference = self._ensure_reference(ckpt)
        n = min(s.max_new_tokens, self.compare_max_new_tokens)
        self._set_status(f"comparing greedy decoding with the reference ({n} tokens max) …", "info")
        comp = compare.compare_with_reference(ckpt.model, reference, ckpt.tokenizer, ids, n)
        self.comparison = comp
        self.compare_html.value = compare.comparison_html(comp, ckpt.tokenizer)
        self.tabs.selected_index = 1
        self._set_status(comp.summary(), "ok" if comp.agree else "error")

    def _inspect_job(self):
        ckpt = self._ensure_model()
        ids = self._prompt_ids_now(self.current_settings())
        reference = self._ensure_reference(ckpt)
        self._set_status(f"capturing both implementations on {len(ids)} prompt tokens …", "info")
        result = compare.inspect_layers(ckpt, reference, ids)
        fig = compare.heatmap_figure(result)
        self.layer_diff, self.layer_figure = result, fig
        self.layers_html.value = compare.layer_summary_html(result)
        self.layers_image.value = core.figure_png(fig)
        self.tabs.selected_index = 2
        first = result.first_divergence
        self._set_status(f"layer diff: first divergent tensor {first}" if first else
                         "layer diff: every tensor within its floor", "error" if first else "ok")
