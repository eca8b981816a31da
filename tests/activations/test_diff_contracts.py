"""The diff's contracts at the edges, on small hand-made dumps: coverage (a naming mistake cannot pass), layout
diagnostics, last-position logits, the floors' dtype, float64 dumps."""
import json

import pytest
import torch

from qwenlab.activations.capture import capture
from qwenlab.activations.diff import diff_dumps
from qwenlab.activations.diff_text import summary_text
from qwenlab.activations.dump import Dump, read_dump, write_dump
from qwenlab.activations.names import canonical_names, point_dims, split_name
from qwenlab.activations.suggest import normalise
from qwenlab.cli import main
from qwenlab.errors import QwenlabError
from qwenlab.paths import DATA_DIR

T, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 5, 48, 4, 2, 8, 96, 300, 2
SIZES = {"T": T, "hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
         "intermediate": INTER, "vocab": VOCAB}
IDS = [11, 22, 33, 44, 55]


def shape_of(name):
    return tuple(eval(dim, {}, SIZES) for dim in point_dims(name))


def tensors(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape_of(name), generator=gen).to(dtype) for name in canonical_names(LAYERS)}


def hf_name(name):
    layer, point = split_name(name)
    point = point.replace("attn.", "self_attn.").replace("mlp.act", "mlp.act_fn")
    return f"model.layers.{layer}.{point}" if layer is not None else name


@pytest.fixture
def files(tmp_path):
    ref = tensors()

    def write(name, tensors_, **metadata):
        return write_dump(tmp_path / f"{name}.safetensors", tensors_, {"prompt_ids": IDS, **metadata})

    return ref, write(name="ref", tensors_=ref), write


def diff_cli(capsys, *argv):
    code = main(["diff", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- coverage ------------------------------------------------------------------------------------------------------

def test_full_coverage_in_json(files, capsys):
    ref, ref_path, write = files
    code, out, _ = diff_cli(capsys, write("same", ref), ref_path, "--json")
    coverage = json.loads(out)["coverage"]
    assert code == 0 and json.loads(out)["verdict"] == "pass"
    assert coverage["compared"] == coverage["reference_names"] == len(canonical_names(LAYERS))
    assert coverage["missing"] == [] and coverage["suggestions"] == {} and coverage["complete"] is True


def test_hf_style_names_cannot_pass(files, capsys):
    ref, ref_path, write = files
    cand = write("hf", {hf_name(n): t for n, t in ref.items()})
    code, out, _ = diff_cli(capsys, cand, ref_path)
    assert code == 1
    head = out.splitlines()[0]
    assert "3 of 39 reference tensors compared" in head and "FAIL (incomplete)" in head
    assert "missing from the candidate: 36 (layers.0.input" in out and "--allow-missing" in out
    assert "did you mean: model.layers.0.input -> layers.0.input" in out

    code, out, _ = diff_cli(capsys, cand, ref_path, "--json")
    payload = json.loads(out)
    assert code == 1 and payload["passed"] is False and payload["verdict"] == "incomplete"
    coverage = payload["coverage"]
    assert coverage["compared"] == 3 and coverage["reference_names"] == 39 and len(coverage["missing"]) == 36
    assert coverage["suggestions"]["model.layers.1.self_attn.q_norm"] == "layers.1.attn.q_norm"
    assert coverage["suggestions"]["model.layers.0.mlp.act_fn"] == "layers.0.mlp.act"
    assert len(coverage["suggestions"]) == 36

    code, out, _ = diff_cli(capsys, cand, ref_path, "--allow-missing")
    assert code == 0 and "PASS" in out.splitlines()[0] and "allowed by --allow-missing" in out


def test_nothing_compared_is_exit_2_naming_both_files(files, capsys):
    ref, ref_path, write = files
    cand = write("wrong", {"model." + hf_name(n) if "." not in n else hf_name(n): t for n, t in ref.items()})
    code, out, err = diff_cli(capsys, cand, ref_path)
    assert code == 2 and "ERROR (nothing compared)" in out
    assert len(err.strip().splitlines()) == 1 and err.startswith("qwenlab diff: error: nothing compared")
    assert str(cand) in err and str(ref_path) in err
    code, out, err = diff_cli(capsys, cand, ref_path, "--allow-missing", "--json")
    assert code == 2 and json.loads(out)["verdict"] == "nothing_compared"


def test_not_produced_metadata_declares_names_and_globs(files, capsys):
    ref, ref_path, write = files
    dropped = {n: t for n, t in ref.items() if not n.endswith(("q_rope", "k_rope")) and n != "layers.0.mlp.act"}
    cand = write("partial", dropped, not_produced=["layers.*.attn.?_rope", "layers.0.mlp.act"])
    code, out, _ = diff_cli(capsys, cand, ref_path, "--json")
    coverage = json.loads(out)["coverage"]
    assert code == 0 and coverage["missing"] == [] and coverage["compared"] == 39 - 5
    assert coverage["not_produced"] == ["layers.0.attn.q_rope", "layers.0.attn.k_rope", "layers.0.mlp.act",
                                        "layers.1.attn.q_rope", "layers.1.attn.k_rope"]
    partly = write("partly", dropped, not_produced="layers.*.attn.?_rope")  # a bare string is one glob
    code, out, _ = diff_cli(capsys, partly, ref_path)
    assert code == 1 and "missing from the candidate: 1 (layers.0.mlp.act)" in out
    bad = write("bad", dropped, not_produced={"layers": 1})
    code, _, err = diff_cli(capsys, bad, ref_path)
    assert code == 2 and "not_produced" in err


def test_suggestions_for_common_misspellings():
    assert normalise("model.layers.3.self_attn.o_proj") == "layers.3.attn.o_proj"
    assert normalise("3.attn.q_norm") == "layers.3.attn.q_norm"
    assert normalise("h.2.attention.k_rope") == "layers.2.attn.k_rope"
    assert normalise("model.embed_tokens") == "embed" and normalise("lm_head") == "logits"
    assert normalise("model.norm") == "norm"
    ref = tensors()
    cand = dict(ref)
    cand["layers.1.attn.qnorm"] = cand.pop("layers.1.attn.q_norm")
    cand["layers.11.mlp.up_proj"] = cand.pop("layers.0.mlp.up_proj")  # another layer's index: no suggestion
    result = diff_dumps(cand, ref)
    assert result.coverage.suggestions == {"layers.1.attn.qnorm": "layers.1.attn.q_norm"}


def test_capture_with_an_include_filter_declares_the_rest(tiny, tmp_path):
    golden = read_dump(DATA_DIR / "golden" / "tiny-qwen3_reference.safetensors")
    tensors_, meta = capture(tiny, golden.prompt_ids, "qwenlab", include=["layers.1.*", "logits"])
    assert sorted(tensors_) == sorted(n for n in golden.tensors if n.startswith("layers.1.") or n == "logits")
    path = write_dump(tmp_path / "part.safetensors", tensors_, meta)
    result = diff_dumps(path, golden)
    assert result.passed and result.coverage.compared == 19 and len(result.coverage.not_produced) == 75 - 19


# --- layout --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, make, layout", [
    ("layers.0.attn.q_norm", lambda t: t.transpose(0, 1),
     "looks like [heads, T, head_dim]; expected [T, heads, head_dim]"),
    ("layers.1.attn.k_rope", lambda t: t.transpose(1, 2),
     "looks like [T, head_dim, kv_heads]; expected [T, kv_heads, head_dim]"),
    ("layers.0.attn.context", lambda t: t.reshape(T, HEADS, HEAD_DIM).transpose(0, 1),
     "looks like [heads, T, head_dim]; expected [T, heads*head_dim]"),
    ("layers.1.attn.q_proj", lambda t: t.reshape(T, HEADS, HEAD_DIM).transpose(0, 1)[None],
     "looks like [1, heads, T, head_dim]; expected [T, heads*head_dim]"),
    ("layers.0.output", lambda t: t.T, "looks like [hidden, T]; expected [T, hidden]"),
])
def test_layout_mistakes_are_named(files, capsys, name, make, layout):
    ref, ref_path, write = files
    cand = write("layout", dict(ref, **{name: make(ref[name]).contiguous()}))
    result = diff_dumps(cand, ref_path)
    row = next(r for r in result.rows if r["name"] == name)
    assert result.first_divergence == name and row["status"] == "layout_mismatch"
    assert row["note"] == f"layout: {layout}"
    assert [r["name"] for r in result.rows if r["exceeds"]] == [name]
    code, out, _ = diff_cli(capsys, cand, ref_path)
    assert code == 1 and f"layout: {layout}" in out
    assert f"cand {list(make(ref[name]).shape)} vs ref {list(ref[name].shape)}" in out


def test_a_wrong_tensor_in_another_shape_is_not_called_a_layout(files):
    ref, _, _ = files
    cand = dict(ref, **{"layers.0.attn.q_norm": torch.randn(HEADS, T, HEAD_DIM)})
    row = next(r for r in diff_dumps(cand, ref).rows if r["name"] == "layers.0.attn.q_norm")
    assert row["status"] == "diverged" and row["note"] is None


def test_text_table_shows_shapes(files):
    ref, _, _ = files
    cand = dict(ref, **{"layers.0.mlp.act": ref["layers.0.mlp.act"] * 1.1})
    text = summary_text(diff_dumps(cand, ref), all_rows=True)
    assert "shape" in text.splitlines()[1]
    assert all(name in text for name in canonical_names(LAYERS))
    line = next(line for line in text.splitlines() if "layers.0.mlp.act " in line)
    assert "diverged" in line and f"[{T}, {INTER}]" in line


# --- last-position logits ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(VOCAB,), (1, VOCAB)])
def test_last_position_logits_are_compared_with_the_last_row(files, capsys, shape):
    ref, ref_path, write = files
    cand = write("last", dict(ref, logits=ref["logits"][-1].reshape(shape)))
    code, out, _ = diff_cli(capsys, cand, ref_path, "--json")
    payload = json.loads(out)
    row = next(r for r in payload["rows"] if r["name"] == "logits")
    assert code == 0 and row["status"] == "ok" and row["note"] == "last position only"
    assert row["cand_shape"] == list(shape) and row["shape"] == [T, VOCAB]
    assert payload["logits"]["positions"] == 1 and payload["logits"]["top1_agreement"] == 1.0

    wrong = write("wrong_last", dict(ref, logits=ref["logits"][-2].reshape(shape)))  # the row before: not the last
    result = diff_dumps(wrong, ref_path)
    assert result.first_divergence == "logits" and result.first_divergence_row["status"] == "diverged"


def test_other_partial_logits_are_a_shape_mismatch(files):
    ref, _, _ = files
    result = diff_dumps(dict(ref, logits=ref["logits"][-2:]), ref)
    assert result.first_divergence_row["status"] == "shape_mismatch"
    assert result.logits is None


# --- floors' dtype -------------------------------------------------------------------------------------------------

def test_floor_dtype_is_the_lowest_precision_of_both_dumps(files):
    ref, _, _ = files
    f32, bf16 = Dump(ref, {"dtype": "float32"}), Dump(ref, {"dtype": "bfloat16"})
    assert diff_dumps(f32, f32).dtype == "float32"
    assert diff_dumps(bf16, f32).dtype == "bfloat16"  # the candidate's metadata
    assert diff_dumps(f32, bf16).dtype == "bfloat16"  # the reference's metadata
    assert diff_dumps(ref, {n: t.to(torch.bfloat16) for n, t in ref.items()}).dtype == "bfloat16"  # stored dtype
    assert diff_dumps(Dump(ref, {"dtype": "float16"}), bf16).dtype == "bfloat16"
    assert diff_dumps(bf16, f32, dtype="float32").dtype == "float32"  # --dtype decides alone
    noisy = Dump({n: t * (1 + 1e-3) for n, t in ref.items()}, {"dtype": "bfloat16"})
    assert diff_dumps(noisy, ref).passed and not diff_dumps(noisy, ref, dtype="float32").passed
    with pytest.raises(QwenlabError, match="candidate: metadata dtype: unknown dtype 'q4_0'"):
        diff_dumps(Dump(ref, {"dtype": "q4_0"}), ref)


def test_float64_dumps_work(files, capsys):
    ref, ref_path, write = files
    cand = write("f64", {n: t.to(torch.float64) for n, t in ref.items()}, dtype="float64")
    code, out, _ = diff_cli(capsys, cand, ref_path, "--json")
    payload = json.loads(out)
    assert code == 0 and payload["dtype"] == "float32" and payload["coverage"]["complete"]
    result = diff_dumps(cand, Dump({n: t.to(torch.float64) for n, t in ref.items()}))
    assert result.dtype == "float64" and result.passed and result.rows[0]["floor"] == 1e-5
