"""`qwenlab bench` runs on the CPU and the tiny fixture and prints its table and JSON (its numbers are not judged
here: speed figures come from running it on the GPU, see doc/performance.md)."""
import json
import subprocess
import sys

ARGS = ["--prompt-tokens", "8", "--new-tokens", "4", "--prefill-tokens", "32", "--device", "cpu"]


def run(*extra):
    done = subprocess.run([sys.executable, "-m", "qwenlab", "bench", *ARGS, *extra], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_bench_prints_the_table_with_qwenlab_and_transformers_rows():
    out = run("--hf", "dynamic").stdout
    assert "copy bandwidth" in out and "floor" in out and "torch 2." in out
    rows = [line.split()[1:] for line in out.splitlines()[1:] if line.startswith("float32 ")]
    assert [r[:2] for r in rows] == [["qwenlab", "graph"], ["qwenlab", "eager"], ["transformers", "generate,"]]
    assert rows[0][2] == "-"  # the graph engine did not run on the CPU: no numbers, and a note saying why
    assert "float32 qwenlab graph: not run: the graph engine needs CUDA" in out
    assert "greedy graph vs eager over" not in out  # only eager ran: nothing to compare


def test_bench_json(tmp_path):
    result = json.loads(run("--hf", "off", "--engines", "eager", "--json", "--out", str(tmp_path / "b.json")).stdout)
    assert json.loads((tmp_path / "b.json").read_text()) == result
    row = result["rows"][0]
    assert row["impl"] == "qwenlab" and row["engine"] == "eager" and row["decode_tok_s"] > 0
    assert result["weight_bytes"] > 0 and result["floor_tok_s"] > 0 and result["facts"]["device"] == "cpu"


def test_graph_vs_eager_names_the_first_parting_token_and_both_margins():
    from qwenlab.bench.decode import graph_vs_eager

    rows = [{"impl": "qwenlab", "engine": "graph", "ids": [5, 6, 7, 8], "top2_margins": [3.0, 2.0, 0.01, 1.0]},
            {"impl": "qwenlab", "engine": "eager", "ids": [5, 6, 9, 9], "top2_margins": [3.0, 2.0, 0.02, 1.5]},
            {"impl": "transformers", "engine": "generate, dynamic cache"}]
    assert graph_vs_eager(rows) == {"tokens": 4, "first_parting": 2, "graph_top2_margin": 0.01,
                                    "eager_top2_margin": 0.02}
    rows[1]["ids"] = [5, 6, 7, 8]
    assert graph_vs_eager(rows) == {"tokens": 4, "first_parting": None}
    assert graph_vs_eager(rows[:1]) is None


def test_bench_with_quant_prints_the_dense_and_the_nvfp4_rows_of_one_run():
    out = run("--hf", "off", "--engines", "eager", "--quant", "nvfp4", "--dtype", "float32").stdout
    rows = [line.split()[:3] for line in out.splitlines()
            if line.startswith(("float32 ", "nvfp4 ")) and " / " not in line]
    assert rows == [["float32", "qwenlab", "eager"], ["nvfp4", "qwenlab", "eager"]]
    assert "nvfp4: weights 0.03" in out and "kernel dequantize" in out  # the CPU path, said so
    assert "nvfp4 / float32 (eager engine): decode" in out


def test_the_decode_floor_counts_the_bytes_a_step_reads(tiny, untied_dir, moe, moe_dir):
    """A step reads every weight of a tied dense model; one row of an untied input embedding; and of a MoE model's
    experts only the num_experts_per_tok of num_experts each layer runs, NVFP4-packed ones too (bench's floor and
    GB/s use these bytes)."""
    from qwenlab.bench.measure import read_bytes_per_token, weight_bytes
    from qwenlab.model.loader import load

    assert read_bytes_per_token(tiny.model) == weight_bytes(tiny.model)
    untied = load(untied_dir, "float32", "cpu").model
    cfg = untied.config
    assert weight_bytes(untied) - read_bytes_per_token(untied) == (cfg.vocab_size - 1) * cfg.hidden_size * 4
    cfg = moe.model.config
    moe_layers = sum(1 for layer in moe.model.model.layers if hasattr(layer.mlp, "experts"))
    expert_bytes = moe_layers * cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    unread = expert_bytes - expert_bytes * cfg.num_experts_per_tok // cfg.num_experts
    embedding = 0 if cfg.tie_word_embeddings else (cfg.vocab_size - 1) * cfg.hidden_size * 4
    assert weight_bytes(moe.model) - read_bytes_per_token(moe.model) == unread + embedding
    assert moe_layers == 2 and cfg.num_experts_per_tok / cfg.num_experts == 0.25
    quantized = load(moe_dir, "float32", "cpu", quant="nvfp4").model  # experts packed into buffers
    packed = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for name, t in quantized.named_buffers() if ".experts." in name}
    unread = sum(packed.values()) - sum(packed.values()) * cfg.num_experts_per_tok // cfg.num_experts
    assert weight_bytes(quantized) - read_bytes_per_token(quantized) == unread + embedding
