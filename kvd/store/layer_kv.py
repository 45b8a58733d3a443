"""Append-only K/V storage of one layer: [num_kv_heads, capacity, head_dim] tensors grown geometrically.

Readers take a snapshot (the current tensors and length) and slice it; an append that reallocates leaves
the old tensors valid for readers that still hold them, and one that writes in place only touches rows past
every snapshot's length.
"""

from __future__ import annotations

import torch

from kvd import hugepages, ingest_kernels

_MIN_GROWTH_TOKENS = 1024
_GROWTH_FACTOR = 1.5


class LayerKV:
    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self._keys = torch.empty((num_kv_heads, 0, head_dim), dtype=dtype)
        self._values = torch.empty((num_kv_heads, 0, head_dim), dtype=dtype)
        self.length = 0
        # Upper bound of |k| per KV head over the stored keys (bounds the error of fast coarse scans).
        self.max_key_norm = torch.zeros(num_kv_heads)

    @property
    def capacity(self) -> int:
        return self._keys.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * self._keys.numel() * self._keys.element_size()

    def bytes_after_append(self, n_tokens: int) -> int:
        """Allocated bytes once n_tokens more are appended (for budget checks before allocating)."""
        needed = self.length + n_tokens
        capacity = self.capacity if needed <= self.capacity else self._grown_capacity(needed)
        return 2 * self.num_kv_heads * capacity * self.head_dim * self._keys.element_size()

    def _grown_capacity(self, needed: int) -> int:
        return max(needed, int(self.capacity * _GROWTH_FACTOR), self.capacity + _MIN_GROWTH_TOKENS)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[1]
        needed = self.length + n
        if needed > self.capacity:
            self._reallocate(self._grown_capacity(needed))
        if n:
            self.max_key_norm = torch.maximum(self.max_key_norm, ingest_kernels.max_key_norm(keys))
        self._keys[:, self.length: needed].copy_(keys)
        self._values[:, self.length: needed].copy_(values)
        self.length = needed

    def _reallocate(self, capacity: int) -> None:
        keys = torch.empty((self.num_kv_heads, capacity, self.head_dim), dtype=self.dtype)
        values = torch.empty_like(keys)
        hugepages.advise(keys)  # before the first write: retrieval reads their rows at random
        hugepages.advise(values)
        keys[:, : self.length].copy_(self._keys[:, : self.length])
        values[:, : self.length].copy_(self._values[:, : self.length])
        self._keys, self._values = keys, values

    def shrink_to_fit(self) -> None:
        if self.capacity != self.length:
            self._reallocate(self.length)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the stored tokens: [num_kv_heads, length, head_dim] views."""
        length = self.length
        return self._keys[:, :length], self._values[:, :length]

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents (used when promoting from disk)."""
        self._keys = keys.contiguous()
        self._values = values.contiguous()
        self.length = keys.shape[1]
        self.max_key_norm = ingest_kernels.max_key_norm(keys)

    def release(self) -> None:
        self._keys = torch.empty((self.num_kv_heads, 0, self.head_dim), dtype=self.dtype)
        self._values = torch.empty_like(self._keys)
        self.length = 0
