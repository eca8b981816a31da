"""How much GPU memory stays reserved after transformers' model is deleted, with and without transformers' allocator
warm-up (caching_allocator_warmup: the model's bytes reserved as one block before the load). A few small tensors
allocated after the load are kept alive, as a notebook keeps its results. Prints free / allocated / reserved GiB at
each step. Run on the GPU machine, in the order given (the second load reuses what the first left reserved):

    PYTHONPATH=. python3 scripts/reserved_after_delete.py CHECKPOINT_DIR

On one H200 with the Qwen3-30B-A3B shape (2026-12-01; doc/evidence/moe-h200/run3/README.md): with the warm-up, 56.9 GiB
stayed reserved with 0 allocated after the delete and torch.cuda.empty_cache().
"""
import sys, torch
import qwenlab as ql
from qwenlab.checks.fit import release
from qwenlab.activations.reference import load_reference
def rep(what):
    free, total = torch.cuda.mem_get_info()
    print(f"{what}: free {free/2**30:.1f} GiB, allocated {torch.cuda.memory_allocated()/2**30:.1f}, reserved {torch.cuda.memory_reserved()/2**30:.1f}", flush=True)
rep("start")
ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device="cuda")
for warm in (True, False):
    ref = load_reference(sys.argv[1], torch.bfloat16, "cuda", allocator_warmup=warm)
    rep(f"reference loaded, allocator_warmup={warm}")
    with torch.no_grad():
        out = ref(ids).logits[:, -1].clone()  # a small tensor that outlives the model
    keep = [torch.empty(1 << 20, device="cuda") for _ in range(4)]
    del ref; release("cuda"); rep(f"reference deleted (a few small tensors kept), allocator_warmup={warm}")
    del out, keep; release("cuda")
