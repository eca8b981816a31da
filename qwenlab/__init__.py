"""qwenlab: prove that a Qwen3 inference path matches HF transformers, and find where it does not.

The names a notebook or a script needs, in one place (imported on first use, so `import qwenlab` stays light):

    import qwenlab as ql
    ckpt = ql.load(ql.LoadSpec(model="~/models/Qwen3-4B-Instruct-2507", device="cuda"))
    ids = ckpt.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    gen = ql.generate(ckpt.model, ids, ql.SamplingParams(max_new_tokens=32), tokenizer=ckpt.tokenizer)
    mine = ql.capture(ckpt.model, ids)                                  # {canonical name: tensor}
    theirs = ql.capture_reference(ql.load_reference(ckpt), ids)         # the same names from transformers
    print(ql.diff(mine, theirs).first_divergence)
    with ql.hooks(ckpt.model, read=["layers.*.output"], replace={"layers.3.output": fn}) as rec:
        ckpt.model(torch.tensor(ids))                                   # rec.tensors: what was read
"""
import importlib

__version__ = "0.1.0"

_API = {
    "LoadSpec": "qwenlab.model.spec",
    "load": "qwenlab.model.loader",
    "Checkpoint": "qwenlab.model.loader",
    "hooks": "qwenlab.model.hooks",
    "hook_points": "qwenlab.model.hooks",
    "Engine": "qwenlab.generation.engine",
    "generate": "qwenlab.generation.decode",
    "Generation": "qwenlab.generation.decode",
    "SamplingParams": "qwenlab.generation.sampling",
    "ChatSession": "qwenlab.generation.chat",
    "capture": ("qwenlab.activations.capture", "capture_qwenlab"),
    "capture_reference": "qwenlab.activations.reference",
    "load_reference": ("qwenlab.activations.nvfp4_reference", "load_reference_for"),
    "diff": ("qwenlab.activations.diff", "diff_dumps"),
    "read_dump": "qwenlab.activations.dump",
    "write_dump": "qwenlab.activations.dump",
    "canonical_names": "qwenlab.activations.names",
    "QwenlabError": "qwenlab.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'qwenlab' has no attribute {name!r}")
    module, attr = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
