import torch
# does a bf16 tensor-core GEMM keep subnormal bf16 inputs? (2^-130 is below bf16's least normal, 2^-126)
a = torch.full((256, 256), 2.0 ** -130, dtype=torch.bfloat16, device="cuda")
b = torch.ones(256, 256, dtype=torch.bfloat16, device="cuda")
c = (a @ b).float()
print("bf16 GEMM of subnormal 2^-130 x 1 over K=256:", c[0, 0].item(), "expected", 256 * 2.0 ** -130)
