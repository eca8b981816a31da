"""The playground's widgets (ipywidgets only) and how they render state; Playground adds the behaviour."""
from __future__ import annotations

import html

import ipywidgets as w

from qwenlab.playground import core

STATUS_COLORS = {"info": "#555", "ok": "#070", "warn": "#a60", "error": "#b00"}


class PlaygroundWidgets:
    """Builds the widget tree (self.widget) and renders status, readouts and output. Needs from the subclass:
    handlers _on_generate/_on_stop/_on_reset/_on_compare/_on_inspect/_on_export, and the attributes ckpt,
    model_dir, readouts, output_text, _history_before, _status_text."""

    def _build_widgets(self):
        wide = w.Layout(width="98%")
        style = {"description_width": "110px"}
        self.header = w.HTML(self._header_html())
        self.input_mode = w.ToggleButtons(options=[("single prompt", "prompt"), ("chat", "chat")], value="prompt",
                                          description="input", style=style)
        self.thinking = w.Checkbox(value=False, description="thinking (chat template)", indent=False)
        self.decode_mode = w.ToggleButtons(options=list(core.DECODE_MODES), value="kv", description="decode",
                                           style=style)
        self.quantization = w.Dropdown(options=[(k if why is None else f"{k} ({why})", k)
                                                for k, why in core.QUANTIZATIONS.items()],
                                       value="none", description="quantization", style=style)
        self.system = w.Textarea(placeholder="system prompt (optional)", description="system", rows=2,
                                 layout=w.Layout(width="98%", display="none"), style=style)
        self.prompt = w.Textarea(placeholder="type a prompt (chat mode: the next user message)", description="prompt",
                                 rows=3, layout=wide, style=style).add_class("qwenlab-prompt")
        self.temperature = w.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.05, description="temperature",
                                         style=style)
        self.top_k = w.IntSlider(value=0, min=0, max=200, description="top-k", style=style)
        self.top_p = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.01, description="top-p", style=style)
        self.max_new_tokens = w.IntSlider(value=64, min=1, max=4096, description="max new tokens",
                                          style=style).add_class("qwenlab-max-new-tokens")
        self.seed = w.IntText(value=0, description="seed", style=style, layout=w.Layout(width="200px"))
        self.generate_button = w.Button(description="Generate", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.reset_button = w.Button(description="Reset chat", icon="undo")
        self.compare_button = w.Button(description="Compare with reference", icon="balance-scale",
                                       layout=w.Layout(width="210px"))
        self.inspect_button = w.Button(description="Inspect layers", icon="search")
        self.export_button = w.Button(description="Export JSON", icon="download")
        self.status_html = w.HTML().add_class("qwenlab-status")
        self.readout_html = w.HTML(self._readout_html()).add_class("qwenlab-readouts")
        self.output_html = w.HTML(self._output_html()).add_class("qwenlab-output")
        self.table_html = w.HTML("<i>no tokens yet</i>")
        self.compare_html = w.HTML("<i>press 'Compare with reference' to run HF transformers greedy on this "
                                   "prompt</i>")
        self.layers_html = w.HTML("<i>press 'Inspect layers' to capture both implementations on this prompt</i>")
        self.layers_image = w.Image(format="png", layout=w.Layout(max_width="760px"))
        self.export_html = w.HTML()
        self.tabs = w.Tab(children=[self.table_html, self.compare_html, w.VBox([self.layers_html, self.layers_image])],
                          titles=("tokens", "reference", "layers"))
        self.input_mode.observe(self._on_input_mode, names="value")
        self.quantization.observe(self._on_quantization, names="value")
        for button, handler in ((self.generate_button, self._on_generate), (self.stop_button, self._on_stop),
                                (self.reset_button, self._on_reset), (self.compare_button, self._on_compare),
                                (self.inspect_button, self._on_inspect), (self.export_button, self._on_export)):
            button.on_click(handler)
        self._busy_buttons = (self.generate_button, self.reset_button, self.compare_button, self.inspect_button)
        self.widget = w.VBox([
            self.header,
            w.HBox([self.input_mode, self.thinking]),
            w.HBox([self.decode_mode, self.quantization]),
            self.system, self.prompt,
            w.HBox([self.temperature, self.top_k, self.top_p]),
            w.HBox([self.max_new_tokens, self.seed]),
            w.HBox([self.generate_button, self.stop_button, self.reset_button, self.compare_button,
                    self.inspect_button, self.export_button]),
            self.status_html, self.readout_html, self.output_html, self.tabs, self.export_html,
        ]).add_class("qwenlab-playground")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_input_mode(self, change):
        self.system.layout.display = "" if change["new"] == "chat" else "none"

    def _on_quantization(self, change):
        why = core.QUANTIZATIONS.get(change["new"])
        if why is not None:
            self._set_status(f"quantization {change['new']}: {why}; using none", "warn")
            self.quantization.value = "none"
        elif self.ckpt is not None:
            self._set_status(f"quantization {change['new']}: the model reloads with it at the next Generate", "info")

    # ---- rendering -----------------------------------------------------------------------------------------
    def _set_busy(self, busy: bool):
        for button in self._busy_buttons:
            button.disabled = busy
        self.stop_button.disabled = not busy

    def _set_status(self, text: str, level: str = "info"):
        self._status_text = text
        self.status_html.value = (f"<span class='qwenlab-status-{level}' style='color:{STATUS_COLORS[level]}'>"
                                  f"{html.escape(text)}</span>")

    def _header_html(self) -> str:
        if self.ckpt is None:
            where = self.model_dir or "embedded tiny-qwen3"
            return f"<b>qwenlab playground</b> · model {html.escape(str(where))} (loads on first use)"
        c, m = self.ckpt.config, self.ckpt.model
        quantization = m.quantization
        quant = f" · {html.escape(quantization.summary())}" if quantization is not None else ""
        return (f"<b>qwenlab playground</b> · {html.escape(self.ckpt.name)} · {c.num_hidden_layers} layers · "
                f"hidden {c.hidden_size} · {str(m.dtype).removeprefix('torch.')} on {m.device} · "
                f"config {c.config_hash()[:12]}{quant}")

    def _show_live(self, s, n, tok_s, elapsed, stop_reason, prefill_s=None, engine="", engine_note=""):
        device = self.ckpt.model.device if self.ckpt else None
        self.readouts = {"tokens": n, "tok_s": tok_s, "elapsed_s": elapsed, "prefill_s": prefill_s,
                         "stop_reason": stop_reason, "engine": engine, "engine_note": engine_note,
                         **core.memory_readouts(device)}
        self.readout_html.value = self._readout_html()
        self.output_html.value = self._output_html(s)

    def _readout_html(self) -> str:
        return core.readout_html(self.readouts)

    def _output_html(self, s: core.Settings | None = None) -> str:
        return core.output_html(s, self._history_before, self.output_text)
