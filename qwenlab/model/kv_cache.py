"""Per-layer key/value cache: preallocated to a max length (static, gpt-fast style) or grown per step.

The forward asks the cache three things: the positions of the new tokens, an attention mask (None = the queries
are the last T of the S keys, causal), and, through each layer's view (`cache.layer(i)`), the keys/values of the whole
sequence after writing the new ones.
"""
import psutil
import torch

from qwenlab.errors import QwenlabError


def check_room(nbytes: int, positions: int, device: torch.device):
    """A cache that cannot fit is one line before torch is asked for it (a context of max_position_embeddings can
    mean terabytes)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if nbytes > free:
        raise QwenlabError(f"a KV cache of {positions} positions needs {nbytes / 2**30:.1f} GiB, {free / 2**30:.1f} "
                           f"GiB is free on {device}: ask for fewer tokens (--max-new-tokens, a shorter prompt)")


class KVCache:
    """Its tensors are ordinary ones even when it is made under torch.inference_mode (generate makes the pooled
    cache there, a chat session outside): torch.compile's guards tell inference tensors apart, so caches of both
    kinds would compile the engine's step twice; ordinary tensors are written in inference mode as well."""
    static_shapes = False

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, max_len: int,
                 dtype: torch.dtype, device, preallocate: bool = True, batch: int = 1):
        self.max_len = max_len
        self.preallocate = preallocate
        self.length = 0
        shape = (batch, num_kv_heads, max_len if preallocate else 0, head_dim)
        devices = device if isinstance(device, (list, tuple)) else [device] * num_layers  # one per layer when split
        if preallocate:
            check_room(2 * num_layers * batch * num_kv_heads * max_len * head_dim * dtype.itemsize, max_len,
                       torch.device(devices[0]))
        with torch.inference_mode(False):  # ordinary tensors wherever the cache is made (the class note says why)
            self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
            self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]

    @classmethod
    def for_config(cls, config, *, max_len: int | None = None, dtype, device, **kwargs):
        max_len = max_len or config.max_position_embeddings
        return cls(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                   max_len=max_len, dtype=dtype, device=device, **kwargs)

    def positions(self, n: int, device) -> torch.Tensor:
        return torch.arange(self.length, self.length + n, device=device)

    def attention_mask(self, n: int):
        return None

    def layer(self, i: int) -> "LayerKV":
        """Layer i's view: what that layer's attention writes its new keys/values to."""
        return LayerKV(self, i)

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


class LayerKV:
    """One layer's view of a cache: update(k_new, v_new) writes them and returns the keys/values so far."""
    static_shapes = False

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.index = cache, layer

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor):
        return self.cache.update(self.index, k_new, v_new)


class StaticLayerKV:
    """One layer of a StaticKVCache with static shapes on: its own buffers, the write positions and `pos`, and no
    layer number, so one compiled layer step serves every layer of the model (the engine compiles one layer, not
    the whole step; qwenlab.generation.engine)."""
    static_shapes = True

    def __init__(self, k: torch.Tensor, v: torch.Tensor, write_at: torch.Tensor, pos: torch.Tensor):
        self.k, self.v, self.write_at, self.pos = k, v, write_at, pos

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor):
        self.k.index_copy_(2, self.write_at, k_new)
        self.v.index_copy_(2, self.write_at, v_new)
        return self.k, self.v


class StaticKVCache(KVCache):
    """A preallocated cache whose length also lives on the device (`pos`), so a one-token step can run with static
    shapes: with `static_shapes` on, positions come from `pos`, new keys are written with index_copy_, attention
    covers all max_len slots under a length mask, and advance() moves `pos` on the device only. A step replayed as
    a CUDA graph runs no Python, so whoever replays it calls replayed() to move the host's `length` to match.
    Off, it behaves exactly like a preallocated KVCache. Only advance(), replayed() and crop() write `length`."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("preallocate", None)
        super().__init__(*args, preallocate=True, **kwargs)
        with torch.inference_mode(False):
            self.pos = torch.zeros(1, dtype=torch.long, device=self.k[0].device)
            self.slots = torch.arange(self.max_len, device=self.k[0].device)
        self.static_shapes = False
        self._write_at = None

    def positions(self, n: int, device) -> torch.Tensor:
        if not self.static_shapes:
            return super().positions(n, device)
        self._write_at = self.pos + torch.arange(n, device=self.pos.device)
        return self._write_at

    def attention_mask(self, n: int):
        return self.slots[None, :] <= self._write_at[:, None] if self.static_shapes else None

    def layer(self, i: int):
        if not self.static_shapes:
            return super().layer(i)
        return StaticLayerKV(self.k[i], self.v[i], self._write_at, self.pos)

    def update(self, layer, k_new, v_new):
        if not self.static_shapes:
            return super().update(layer, k_new, v_new)
        return self.layer(layer).update(k_new, v_new)

    def advance(self, n: int):
        if self.static_shapes:
            self.pos.add_(n)
        else:
            self.length += n
            self.pos.fill_(self.length)

    def replayed(self, n: int):
        """A captured step moved `pos` by n on the device: the host's length follows."""
        self.length += n

    def crop(self, length: int):
        super().crop(length)
        self.pos.fill_(self.length)
