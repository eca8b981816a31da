"""Teacher forcing the reference (capture_reference(inputs=...)): float32 layer inputs fed to a bfloat16 reference
are cast to the layer's hidden dtype, which is its norm's. A compressed-tensors NVFP4 layer lists float32 scales
among its parameters: taking the first parameter's dtype had fed float32 into bf16 linears (notebooks 03 and 06
failed on CUDA with an NVFP4 model and transformers 5.17)."""
import torch

from qwenlab.activations.reference import capture_reference


def test_float32_inputs_reach_a_bf16_layer_that_lists_a_float32_parameter_first(tiny_ref, tiny):
    ids = tiny.tokenizer.encode("The quick brown fox")
    truth = capture_reference(tiny_ref, ids)  # float32
    bf16 = tiny_ref.__class__(tiny_ref.config).to(torch.bfloat16).eval()
    bf16.load_state_dict(tiny_ref.state_dict())
    layer = bf16.model.layers[1]
    layer.register_parameter("a_scale", torch.nn.Parameter(torch.ones(4, dtype=torch.float32)))
    assert next(layer.parameters()).dtype == torch.float32  # as a compressed-tensors layer's scales can be
    forced = capture_reference(bf16, ids, inputs=truth)
    assert forced["layers.1.input"].dtype == torch.bfloat16
    assert torch.equal(forced["layers.1.input"], truth["layers.1.input"].to(torch.bfloat16))
    plain = capture_reference(bf16, ids)
    rel = (plain["logits"].float() - truth["logits"]).norm() / truth["logits"].norm()
    assert 0 < rel < 0.05  # a bf16 run of the same weights, not another model


def test_a_float32_reference_holds_decompressed_bf16_weights_in_float32(tiny_ref):
    """transformers 5.17 left the weights compressed-tensors decompressed in bfloat16 inside a float32 model (its
    first matmul failed on an H200); load_reference upcasts them, which changes no number. A bf16 model is left as
    it is (an upcast is exact, a downcast is not)."""
    from qwenlab.activations.reference import _weights_in

    model = tiny_ref.__class__(tiny_ref.config).eval()
    model.load_state_dict(tiny_ref.state_dict())
    proj = model.model.layers[0].self_attn.q_proj
    proj.weight.data = proj.weight.data.to(torch.bfloat16)
    kept = proj.weight.data.clone()
    _weights_in(model, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(proj.weight.data, kept.float())
    proj.weight.data = proj.weight.data.to(torch.bfloat16)
    _weights_in(model, torch.bfloat16)
    assert proj.weight.dtype == torch.bfloat16 and model.model.layers[1].self_attn.q_proj.weight.dtype == torch.float32
