"""Values of the wrong type or range (config.json, generation/tokenizer configs, sampling flags, dump metadata, floor
files, output paths): one line naming the file and key or the flag, exit 2, nothing written."""
import math
import re
import sys

import pytest
import torch
from safetensors.torch import save_file

from qwenlab.activations.diff import diff_dumps, read_floors
from qwenlab.errors import QwenlabError
from qwenlab.generation.decode import generate
from qwenlab.generation.sampling import SamplingParams


@pytest.mark.parametrize("key, value, needle", [
    ("num_hidden_layers", "four", "num_hidden_layers must be an integer >= 1, got 'four'"),
    ("num_hidden_layers", 0, "num_hidden_layers must be an integer >= 1, got 0"),
    ("num_hidden_layers", -3, "got -3"),
    ("num_hidden_layers", 3.7, "got 3.7"),
    ("num_hidden_layers", True, "got True"),
    ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1"),
    ("num_key_value_heads", 3, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("head_dim", 31, "head_dim=31 is odd"),
    ("vocab_size", None, "missing required key 'vocab_size'"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a finite number > 0, got 'tiny'"),
    ("rms_norm_eps", -1e-6, "got -1e-06"),
    ("rms_norm_eps", math.nan, "got nan"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": -5}, "rope_theta must be a finite number > 0, got -5"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": math.inf}, "got inf"),
    ("rope_parameters", [1], "rope_parameters must be a JSON object or null"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("architectures", "Qwen3ForCausalLM", "architectures must be a list of strings"),
])
def test_config_values(ckpt, fails, edit_json, key, value, needle):
    edit_json(ckpt / "config.json", lambda c: c.pop(key) if value is None else c.update({key: value}))
    fails("generate", "--model", ckpt, "--prompt", "hi", needles=(f"{ckpt / 'config.json'}: ", needle))


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_a_config_file_that_is_a_json_list(ckpt, fails, name):
    (ckpt / name).write_text("[1, 2, 3]")
    fails("generate", "--model", ckpt, "--prompt", "hi", needles=(name, "the JSON root is an array, not an object"))


def test_vocab_size_below_the_tokenizer_ids(ckpt, fails, edit_json, rewrite_weights):
    rewrite_weights(ckpt, lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:1000]}))
    edit_json(ckpt / "config.json", lambda c: c.update(vocab_size=1000))
    fails("generate", "--model", ckpt, "--prompt", "hi",
          needles=("vocab_size=1000", "ids up to 151668", "tokenizer.json"))


def test_a_prompt_that_is_not_utf8(tiny_dir, fails):
    """Python hands argv bytes that are not UTF-8 to the CLI as lone surrogates (surrogateescape): b"\\xff" is
    "\\udcff"."""
    assert b"ok \xff".decode(sys.getfilesystemencoding(), "surrogateescape") == "ok \udcff"
    fails("tokenize", "--model", tiny_dir, "--text", "ok \udcff", needles=("not valid UTF-8", "byte 0xff"))


@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "nan", "--temperature: 'nan' is not a finite number"),  # refused at parse time
    ("--seed", str(2**64), f"--seed: {2**64} is outside [0, {2**63 - 1}]"),
])
def test_sampling_flags(tiny_dir, fails, flag, value, needle):
    fails("generate", "--model", tiny_dir, "--prompt", "hi", flag, value, needles=(needle,))


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": math.inf}, "temperature=inf"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"seed": -1}, "seed=-1"),
    ({"seed": 2**63}, "seed=9223372036854775808"),
])
def test_sampling_params(kwargs, needle):
    with pytest.raises(QwenlabError, match=re.escape(needle)):
        SamplingParams(**kwargs)


def test_a_tiny_positive_temperature_samples(tiny):
    ids = tiny.tokenizer.encode("Once upon a time")
    tiny_t = generate(tiny.model, ids, SamplingParams(temperature=1e-45, seed=2**63 - 1, max_new_tokens=4),
                      stop_ids=(-1,))
    assert tiny_t.ids == generate(tiny.model, ids, SamplingParams(max_new_tokens=4), stop_ids=(-1,)).ids


def dump(path, tensors=None, **metadata):
    tensors = tensors or {"embed": torch.ones(2, 4), "logits": torch.zeros(2, 8)}
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items()})
    return path


@pytest.mark.parametrize("metadata, needle", [
    ({"prompt_ids": '"5"'}, "metadata 'prompt_ids' must be a JSON list of token ids"),
    ({"prompt_ids": "[1, -2]"}, "metadata 'prompt_ids'"),
    ({"prompt_ids": "[1, true]"}, "metadata 'prompt_ids'"),
    ({"json_keys": '"5"'}, "metadata 'json_keys' must be a JSON list of key names"),
    ({"json_keys": "[5]"}, "metadata 'json_keys'"),
    ({"not_produced": "[1]"}, "metadata 'not_produced' must be a JSON list of names or globs"),
])
def test_dump_metadata(tmp_path, fails, metadata, needle):
    bad, good = dump(tmp_path / "bad.safetensors", **metadata), dump(tmp_path / "good.safetensors")
    fails("diff", bad, good, needles=(str(bad), needle))


def test_a_zero_dimensional_dump_tensor(tmp_path, fails):
    bad = dump(tmp_path / "bad.safetensors", {"embed": torch.ones(2, 4), "layers.0.input": torch.tensor(1.0)})
    fails("diff", dump(tmp_path / "good.safetensors"), bad,
          needles=(str(bad), "tensor 'layers.0.input' is 0-dimensional"))


@pytest.mark.parametrize("text, needle", [
    (None, "not found"),
    ("{oops", "not valid JSON"),
    ("[0.1]", "must be a JSON object"),
    ('{"bfloat16": "0.1"}', "floor 'bfloat16' = '0.1' must be a finite number >= 0"),
    ('{"layers.*": -0.5}', "floor 'layers.*' = -0.5"),
    ('{"float32": NaN}', "floor 'float32' = nan"),
    ('{"float32": Infinity}', "= inf"),
    ('{"float32": true}', "= True"),
])
def test_floor_files(tmp_path, text, needle):
    path = tmp_path / "floors.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(QwenlabError) as info:
        read_floors(path)
    assert str(info.value).startswith(f"--floors {path}: ") and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_floors_given_to_the_diff_directly(tmp_path):
    a = dump(tmp_path / "a.safetensors")
    with pytest.raises(QwenlabError, match="floor 'embed' = -1"):
        diff_dumps(a, a, floors={"embed": -1})
    assert read_floors(tmp_path.joinpath("ok.json").write_text('{"embed": 0.5, "bfloat16": 0}') and
                       tmp_path / "ok.json") == {"embed": 0.5, "bfloat16": 0}


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_capture_out_that_cannot_be_written(tiny_dir, tmp_path, fails, where):
    (tmp_path / "file.txt").write_text("keep")
    out = tmp_path if where == "a folder" else tmp_path / "file.txt" / "dump.safetensors"
    fails("capture", "--model", tiny_dir, "--prompt", "hi", "--impl", "qwenlab", "--out", out,
          needles=(str(out), "is a directory" if where == "a folder" else "cannot be written"))
    assert (tmp_path / "file.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
