"""Will a reference fit beside what is loaded (qwenlab.checks.fit, notebooks 04 and 06)? Decided from config.json and
(fake) free memory before anything loads; a load that runs out of memory anyway is dropped with a reason."""
import pytest
import torch

from qwenlab.checks.fit import load_if_fits, reference_fit
from qwenlab.memory.plan import HEADROOM, DeviceMemory, model_bytes, room
from qwenlab.memory.predict import weight_bytes
from qwenlab.model.config import config_from_dict
from qwenlab.model.tiny import config_json

GB = 10 ** 9
Q32 = config_from_dict(config_json("qwen3-32b"))
H200 = 150 * GB  # what torch.cuda.mem_get_info reports as an H200's total (143771 MiB)


def gpus(*free):
    return [DeviceMemory(f"cuda:{i}", int(f), H200) for i, f in enumerate(free)]


def test_room_is_the_first_device_or_all_of_them_when_spread():
    devices = gpus(100 * GB, 40 * GB)
    assert room(devices) == pytest.approx(100 * GB * HEADROOM)
    assert room(devices, spread=True) == pytest.approx(140 * GB * HEADROOM)


def test_32b_notebook_06_on_one_h200_keeps_the_quantized_reference_but_not_its_float32_twin():
    """The NVFP4 model resident (about 20.7 GB), then the bfloat16 quantized reference (about 66 GB): the float32 one
    (about 131 GB) no longer fits one H200, and fits when spread over two."""
    tokens = 32
    nvfp4 = weight_bytes(Q32, "nvfp4")["total"]
    assert 20 * GB < nvfp4 < 21 * GB
    after_model = H200 - nvfp4
    ref_q = reference_fit("the quantized reference", Q32, "bfloat16", tokens, gpus(after_model), spread=False)
    assert ref_q.fits and 65 * GB < ref_q.need < 67 * GB
    after_ref = after_model - ref_q.need
    one = reference_fit("the float32 quantized reference", Q32, "float32", tokens, gpus(after_ref), spread=False,
                        beside="qwenlab's model and the quantized reference")
    assert not one.fits and 130 * GB < one.need < 133 * GB
    assert one.why_not().startswith("the float32 quantized reference needs 12") and \
        "free beside qwenlab's model and the quantized reference" in one.why_not()
    two = reference_fit("the float32 quantized reference", Q32, "float32", tokens, gpus(after_ref, H200), spread=True)
    assert two.fits and two.load_kwargs() == {"device_map": "auto"}
    # and the unquantized bfloat16 reference of sections 3-4, once the quantized ones are freed
    assert reference_fit("the unquantized reference", Q32, "bfloat16", 256, gpus(after_model), spread=False).fits


def test_a_reference_that_does_not_fit_is_never_loaded():
    fit = reference_fit("the float32 reference", Q32, "float32", 16, gpus(80 * GB), spread=False)
    calls = []
    model, why = load_if_fits(fit, lambda **kw: calls.append(kw), "cpu")
    assert model is None and calls == [] and why == fit.why_not()
    assert fit.need == model_bytes(Q32, "float32", 16)[1]


def test_a_load_that_runs_out_of_memory_anyway_gives_a_reason():
    fit = reference_fit("the float32 reference", Q32, "float32", 16, gpus(2 * H200, H200), spread=True)

    def load(**kw):
        assert kw == {"device_map": "auto"}
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    model, why = load_if_fits(fit, load, "cpu")
    assert model is None and why == "the float32 reference does not fit (CUDA out of memory. Tried to allocate 2.00 GiB)"
    model, why = load_if_fits(fit, lambda **kw: "loaded", "cpu")
    assert (model, why) == ("loaded", None)
