"""The playground driven from Python, no browser: the same handlers the buttons call."""
import json
import math
import shutil
import time

import pytest
import torch

from qwenlab.checks import playground_demo
from qwenlab.generation.decode import generate
from qwenlab.generation.sampling import SamplingParams
from qwenlab.model.loader import load
from qwenlab.model.tiny import ensure_tiny
from qwenlab.playground.app import Playground

PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def ckpt():
    return load(ensure_tiny(), "float32", "cpu")


@pytest.fixture(scope="module")
def reference(ckpt):
    from qwenlab.activations.reference import load_reference

    return load_reference(ckpt.path, ckpt.model.dtype, ckpt.model.device)


@pytest.fixture
def pg(ckpt, tmp_path):
    return Playground(checkpoint=ckpt, out_dir=tmp_path)


def run(pg, timeout=120, **values):
    for name, value in values.items():
        getattr(pg, name).value = value
    pg.generate_button.click()
    assert pg.wait(timeout), f"generation still running after {timeout} s: {pg.status}"
    return pg.result


@pytest.mark.parametrize("settings", [
    dict(decode_mode="kv", max_new_tokens=16),
    dict(decode_mode="replay", max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=7),
])
def test_streamed_text_equals_decode_api(pg, ckpt, settings):
    result = run(pg, prompt=PROMPT, **settings)
    assert result is not None, pg.status
    tok = ckpt.tokenizer
    params = SamplingParams(temperature=settings.get("temperature", 0.0), top_k=settings.get("top_k", 0),
                            top_p=settings.get("top_p", 1.0), seed=settings.get("seed", 0),
                            max_new_tokens=settings["max_new_tokens"])
    direct = generate(ckpt.model, tok.encode(PROMPT), params, mode=settings["decode_mode"], tokenizer=tok)
    assert pg.output_text == direct.text
    assert result.ids == direct.ids and result.stop_reason == direct.stop_reason
    assert pg.output_text and "done" in pg.status
    assert pg.readouts["tokens"] == len(direct.ids) and pg.readouts["stop_reason"] == direct.stop_reason
    assert pg.readouts["tok_s"] > 0 and pg.readouts["rss_bytes"] > 0
    assert "qwenlab-stream" in pg.output_html.value and "tok/s" in pg.readout_html.value
    assert pg.check_against_generate()["text_equal"]


def test_chat_two_turns_then_reset(pg, ckpt):
    tok = ckpt.tokenizer
    pg.input_mode.value = "chat"
    pg.system.value = "You are terse."
    first = run(pg, prompt="Hi there", max_new_tokens=10)
    second = run(pg, prompt="And again?", max_new_tokens=10)
    system = {"role": "system", "content": "You are terse."}
    history = [system, {"role": "user", "content": "Hi there"}]
    ids1 = tok.encode_chat(history, enable_thinking=False)
    direct1 = generate(ckpt.model, ids1, SamplingParams(max_new_tokens=10), tokenizer=tok)
    assert first.prompt_ids == ids1 and first.ids == direct1.ids
    history += [{"role": "assistant", "content": direct1.text}, {"role": "user", "content": "And again?"}]
    ids2 = tok.encode_chat(history, enable_thinking=False)
    direct2 = generate(ckpt.model, ids2, SamplingParams(max_new_tokens=10), tokenizer=tok)
    assert second.prompt_ids == ids2 and pg.output_text == direct2.text
    assert len(pg.session.messages) == 5
    assert pg.history[-1]["reused_tokens"] > 0, "the session should reuse the first turn's KV cache"
    assert "And again?" in pg.output_html.value and "Hi there" in pg.output_html.value

    pg.reset_button.click()
    assert pg.session is None and pg.output_text == "" and "reset" in pg.status
    third = run(pg, prompt="And again?", max_new_tokens=10)
    assert third.prompt_ids == tok.encode_chat([system, {"role": "user", "content": "And again?"}],
                                               enable_thinking=False)


def test_stop_mid_generation(pg, ckpt):
    pg.prompt.value, pg.max_new_tokens.value = PROMPT, 2000
    pg.generate_button.click()
    deadline = time.monotonic() + 120
    while len(pg._recorder.rows if pg._recorder else []) < 3 and pg.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pg.busy, f"generation ended before Stop: {pg.status}"
    assert pg.generate_button.disabled and not pg.stop_button.disabled
    pg.stop_button.click()
    assert pg.wait(60)
    result = pg.result
    assert result.stop_reason == "stopped" and 3 <= len(result.ids) < 2000
    assert pg.readouts["stop_reason"] == "stopped" and "stopped" in pg.status
    assert pg.output_text == ckpt.tokenizer.decode(result.ids)
    assert not pg.generate_button.disabled and pg.stop_button.disabled


def test_error_messages_do_not_raise(pg, tmp_path):
    pg.prompt.value = "   "
    pg.generate_button.click()
    assert not pg.busy and "empty" in pg.status and pg.result is None
    assert "qwenlab-status-error" in pg.status_html.value

    pg.prompt.value = "hello " * 5000
    pg.generate_button.click()
    assert pg.wait(120)
    assert "max_position_embeddings=4096" in pg.status and pg.result is None

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for model_dir in (tmp_path / "missing", broken):
        bad = Playground(model_dir=str(model_dir), out_dir=tmp_path)
        bad.prompt.value = PROMPT
        bad.generate_button.click()
        assert bad.wait(60)
        assert bad.status.startswith("model failed to load"), bad.status
        assert bad.result is None and not bad.generate_button.disabled

    pg.stop_button.click()
    assert "nothing is running" in pg.status


def test_nvfp4_reloads_the_model_quantized(pg, ckpt):
    run(pg, prompt=PROMPT, max_new_tokens=6)
    assert pg.ckpt is ckpt
    pg.quantization.value = "nvfp4"
    assert "reloads" in pg.status
    run(pg, prompt=PROMPT, max_new_tokens=6)
    assert pg.ckpt is not ckpt and pg.ckpt.model.quantization.kernel == "dequantize"
    assert "nvfp4, quantized at load" in pg.header.value
    quantized = load(ensure_tiny(), "float32", "cpu", quant="nvfp4")
    direct = generate(quantized.model, ckpt.tokenizer.encode(PROMPT), SamplingParams(max_new_tokens=6),
                      tokenizer=ckpt.tokenizer)
    assert pg.output_text == direct.text
    pg.quantization.value = "none"
    run(pg, prompt=PROMPT, max_new_tokens=6)
    assert pg.ckpt is ckpt


def test_export_json(pg, tmp_path):
    run(pg, prompt=PROMPT, max_new_tokens=8, temperature=0.5, seed=3)
    data = pg.export_json()
    assert data["kind"] == "qwenlab.playground.app" and data["model"]["num_hidden_layers"] == 4
    assert data["settings"]["temperature"] == 0.5 and data["settings"]["seed"] == 3
    gen = data["generations"][-1]
    assert gen["prompt"] == PROMPT and gen["text"] == pg.output_text and gen["tokens"] == len(pg.result.ids)
    pg.export_button.click()
    files = list((tmp_path / "reports").glob("playground_*.json"))
    assert len(files) == 1 and str(files[0]) in pg.export_html.value
    saved = json.loads(files[0].read_text())
    assert saved["generations"][-1]["ids"] == pg.result.ids and saved["settings"] == data["settings"]


def test_token_table_rows(pg, ckpt):
    result = run(pg, prompt=PROMPT, max_new_tokens=6, temperature=1.0, seed=11)
    table = pg.token_table
    assert list(table["id"]) == result.ids
    seq = torch.tensor(result.prompt_ids + result.ids)
    logprobs = torch.log_softmax(ckpt.model(seq)[0].float(), -1)
    start = len(result.prompt_ids) - 1
    for step, row in table.iterrows():
        assert sum(row["top5_probs"]) <= 1 + 1e-6 and len(row["top5_ids"]) == 5
        expected = float(logprobs[start + step, row["id"]])
        assert math.isclose(row["logprob"], expected, abs_tol=1e-4), (step, row["logprob"], expected)
        assert math.isclose(row["top5_probs"][0], float(logprobs[start + step].max().exp()), abs_tol=1e-5)
    assert "top5" in table.columns and table["token"].str.startswith(("'", '"')).all()


def test_compare_and_inspect_agree_on_tiny_fp32(ckpt, reference, tmp_path):
    pg = Playground(checkpoint=ckpt, reference_model=reference, out_dir=tmp_path)
    run(pg, prompt=PROMPT, max_new_tokens=12)
    pg.compare_button.click()
    assert pg.wait(300), pg.status
    comp = pg.comparison
    assert comp is not None, pg.status
    assert comp.agree and comp.first_disagreement is None, comp.summary()
    assert comp.qwenlab_ids == pg.result.ids == comp.reference_ids
    assert comp.logits["top1_agreement"] == 1.0 and "agree" in pg.status
    assert len(comp.qwenlab_top) == 5 and comp.qwenlab_top[0]["id"] == comp.reference_top[0]["id"]

    pg.inspect_button.click()
    assert pg.wait(300), pg.status
    assert pg.layer_diff is not None and pg.layer_diff.passed, pg.status
    assert pg.layer_figure is not None and pg.layers_image.value[:4] == b"\x89PNG"
    assert pg.export_json()["comparison"]["agree"] is True


def test_planted_rope_bug_is_marked(ckpt, reference, tmp_path):
    """A wrong RoPE base (one of the story's bugs): a checkpoint whose config.json says rope_theta 10 beside the
    right reference: compare marks token 0, inspect names the first q_rope."""
    bad_dir = tmp_path / "bad-rope"
    shutil.copytree(ckpt.path, bad_dir)
    config = json.loads((bad_dir / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10.0
    (bad_dir / "config.json").write_text(json.dumps(config))
    pg = Playground(checkpoint=load(bad_dir, "float32", "cpu"), reference_model=reference, out_dir=tmp_path)
    run(pg, prompt=PROMPT, max_new_tokens=8)
    pg.compare_button.click()
    assert pg.wait(300)
    comp = pg.comparison
    assert comp.first_disagreement == 0 and "top1" in comp.kind, comp.summary()
    assert comp.qwenlab_top[0]["id"] != comp.reference_top[0]["id"]
    assert "first disagreement at generated token 0" in pg.status
    assert "qwenlab-compare" in pg.compare_html.value
    pg.inspect_button.click()
    assert pg.wait(300)
    assert pg.layer_diff.first_divergence == "layers.0.attn.q_rope", pg.status
    assert "layers.0.attn.q_rope" in pg.layers_html.value
    metrics, reasons = playground_demo.verdict(pg, {"require_reference_agreement": {"float32": True},
                                                    "require_layers_within_floor": {"float32": True}})
    assert metrics["text_equal"] and metrics["reference_agree"] is False
    assert any("reference comparison" in r for r in reasons) and any("q_rope" in r for r in reasons)


def test_preload_then_generate_at_once(tmp_path):
    pg = Playground(out_dir=tmp_path, preload=True)  # loads the embedded tiny model in the background
    pg.prompt.value, pg.max_new_tokens.value = PROMPT, 4
    pg.generate_button.click()  # while the preload may still hold the lock: queued behind it, not refused
    assert pg.wait(120) and pg.result is not None, pg.status
    assert len(pg.result.ids) == 4 and pg.stop_button.disabled and "tiny-qwen3" in pg.header.value


def test_the_readout_says_which_engine_ran(pg):
    run(pg, prompt=PROMPT, decode_mode="kv", max_new_tokens=4)
    assert pg.readouts["engine"] == pg.result.engine == "eager"
    assert "needs CUDA" in pg.readouts["engine_note"] and "qwenlab-engine" in pg.readout_html.value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graph engine needs a GPU")
@pytest.mark.parametrize("input_mode", ["prompt", "chat"])
def test_the_playground_runs_the_graph_engine_on_cuda(tmp_path, input_mode):
    pg = Playground(ensure_tiny(), device="cuda", dtype="float32", out_dir=tmp_path)
    result = run(pg, timeout=600, prompt=PROMPT, input_mode=input_mode, decode_mode="kv", max_new_tokens=16)
    assert result is not None, pg.status
    assert result.engine == "graph" and pg.readouts["engine"] == "graph", result.engine_note
    assert len(pg.token_table) == len(result.ids)  # the per-token table is filled under the graph engine too
    direct = generate(pg.ckpt.model, result.prompt_ids, SamplingParams(max_new_tokens=16), engine="eager",
                      tokenizer=pg.ckpt.tokenizer)
    assert result.ids == direct.ids
