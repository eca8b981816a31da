"""Per-layer key/value cache: preallocated to a max length (static, gpt-fast style) or grown per step."""
import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, max_len: int,
                 dtype: torch.dtype, device, preallocate: bool = True, batch: int = 1):
        self.max_len = max_len
        self.preallocate = preallocate
        self.length = 0
        shape = (batch, num_kv_heads, max_len if preallocate else 0, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_config(cls, config, *, max_len: int | None = None, dtype, device, preallocate=True):
        max_len = max_len or config.max_position_embeddings
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                   max_len=max_len, dtype=dtype, device=device, preallocate=preallocate)

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Appends [B, KVH, T, D] at self.length; returns the keys/values of the whole sequence so far."""
        start, end = self.length, self.length + k_new.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.preallocate:
            self.k[layer][:, :, start:end] = k_new
            self.v[layer][:, :, start:end] = v_new
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        self.k[layer] = torch.cat([self.k[layer], k_new], dim=2)
        self.v[layer] = torch.cat([self.v[layer], v_new], dim=2)
        return self.k[layer], self.v[layer]

    def advance(self, n: int):
        self.length += n

    def crop(self, length: int):
        """Forget every position from `length` on (used when a new turn re-renders part of the history)."""
        self.length = min(self.length, length)
        if not self.preallocate:
            self.k = [k[:, :, :self.length] for k in self.k]
            self.v = [v[:, :, :self.length] for v in self.v]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
