"""Messages that say what is wrong: the dtype of a packed tensor (not 'missing'), the stored value of a bad scale,
non-finite logits (not 'KL 0, top-1 100%'), a broken reference (not 'diverged'), a file diffed against itself,
flags that used to be accepted silently."""
import shutil

import pytest
import torch
from safetensors.torch import save_file

from qwenlab.errors import QwenlabError
from qwenlab.quant.layouts import LAYOUTS, MODELOPT
from qwenlab.quant.reader import quantized_modules

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def ct(nvfp4_ct, tmp_path):
    return shutil.copytree(nvfp4_ct, tmp_path / "ct")


def test_a_packed_tensor_of_the_wrong_dtype(ct, fails, rewrite_weights):
    rewrite_weights(ct, lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"].to(torch.int8)}))
    err = fails("generate", "--model", ct, "--prompt", "hi",
                needles=(f"{Q}.weight_packed has dtype int8, NVFP4 packed codes are uint8",))
    assert "missing" not in err


def test_a_modelopt_weight_of_the_wrong_dtype_beside_its_scales():
    shapes = {f"{Q}.weight": (8, 16), f"{Q}.weight_scale": (8, 2), f"{Q}.weight_scale_2": ()}
    dtypes = {f"{Q}.weight": "int8", f"{Q}.weight_scale": "float8_e4m3fn", f"{Q}.weight_scale_2": "float32"}
    with pytest.raises(QwenlabError, match=f"{Q}.weight has dtype int8, NVFP4 packed codes are uint8"):
        quantized_modules(shapes, dtypes, LAYOUTS[MODELOPT], {Q: (8, 32)}, "ckpt")
    dense = {f"{Q}.weight": (8, 32)}  # no scales beside it: an excluded, unquantized linear
    assert quantized_modules(dense, {f"{Q}.weight": "bfloat16"}, LAYOUTS[MODELOPT], {Q: (8, 32)}, "ckpt") == {}


@pytest.mark.parametrize("name, what", [("weight_global_scale", "per-tensor scale"),
                                        ("input_global_scale", "activation input scale")])
def test_a_zero_global_scale_names_the_stored_value(ct, fails, rewrite_weights, name, what):
    rewrite_weights(ct, lambda t: t[f"{Q}.{name}"].zero_())
    fails("generate", "--model", ct, "--prompt", "hi",
          needles=(f"{Q}.{name} = 0.0: compressed-tensors stores 1 / scale, so the {what} would be inf",))


def test_a_nan_input_scale_is_named(ct, fails, rewrite_weights):
    rewrite_weights(ct, lambda t: t[f"{Q}.input_global_scale"].fill_(float("nan")))
    fails("generate", "--model", ct, "--prompt", "hi", needles=(f"{Q}.input_global_scale: holds NaN",))


def dumps(tmp_path, **sides):
    """Two small dumps; sides maps 'cand'/'ref' to an edit of its tensors."""
    base = {"embed": torch.randn(3, 8, generator=torch.Generator().manual_seed(0)),
            "logits": torch.randn(3, 16, generator=torch.Generator().manual_seed(1))}
    paths = []
    for side in ("cand", "ref"):
        tensors = {k: v.clone() for k, v in base.items()}
        sides.get(side, lambda t: None)(tensors)
        save_file(tensors, str(tmp_path / f"{side}.safetensors"))
        paths.append(tmp_path / f"{side}.safetensors")
    return paths


@pytest.mark.parametrize("side", ["cand", "ref"])
def test_nonfinite_logits_are_not_a_perfect_match(tmp_path, cli, side):
    cand, ref = dumps(tmp_path, **{side: lambda t: t["logits"][1].fill_(float("nan"))})
    code, out, _ = cli("diff", cand, ref)
    who = "candidate" if side == "cand" else "reference"
    assert code == 1 and f"logits (3 positions): not compared: the {who} logits hold NaN or +inf" in out
    assert "KL mean" not in out and "100.0%" not in out


def test_a_nan_only_in_the_reference_is_the_reference_s_problem(tmp_path, cli):
    cand, ref = dumps(tmp_path, ref=lambda t: t["embed"].__setitem__((0, 0), float("nan")))
    code, out, _ = cli("diff", cand, ref)
    assert code == 1
    assert "ERROR (the reference holds NaN or inf: it cannot judge); first divergence: none" in out
    assert "reference_nonfinite" in out and "diverged" not in out


def test_a_file_diffed_against_itself_says_so(tmp_path, cli):
    cand, _ = dumps(tmp_path)
    code, out, _ = cli("diff", cand, cand)
    assert code == 0
    assert f"note: candidate and reference are the same file ({cand}): nothing independent was compared" in out


def test_negative_temperature_is_not_silently_greedy(tiny_dir, fails):
    fails("generate", "--model", tiny_dir, "--prompt", "hi", "--temperature", "-1",
          needles=("--temperature: -1 is outside [0.0, inf]",))


@pytest.mark.parametrize("size", ["-5GB", "0", "garbage", "infGB"])
def test_a_bad_shard_size_is_refused_before_anything(tiny_dir, tmp_path, fails, size):
    fails("quantize", tiny_dir, tmp_path / "dst", f"--max-shard-size={size}",
          needles=(f"--max-shard-size {size!r}: give a positive size",))
    assert list(tmp_path.iterdir()) == []
