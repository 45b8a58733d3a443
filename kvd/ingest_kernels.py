"""Compiled single-pass kernels of the append path: the NaN/Inf test of incoming K/V and the largest key norm
per KV head.

Why: in torch both need temporaries (an integer mask per element, a float32 copy of the keys for the norm)
and several passes; appends of a long prefill ran at ~0.5 GB/s on 2 cores with these two taking half the
time. Each kernel here reads its input once, releases the GIL, and runs on one layer so that the daemon can
run the layers of one append in parallel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numba import njit

# A float is NaN or infinite exactly when all its exponent bits are set.
_EXPONENT_MASKS = {torch.float16: (torch.int16, np.uint16, 0x7C00), torch.bfloat16: (torch.int16, np.uint16, 0x7F80),
                   torch.float32: (torch.int32, np.uint32, 0x7F800000)}


@njit(cache=True, nogil=True)
def _count_all_set(bits: np.ndarray, mask: int) -> int:
    bad = 0
    for i in range(bits.shape[0]):
        bad += (bits[i] & mask) == mask
    return bad


def count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN and infinite values in a float16/bfloat16/float32 tensor (others: torch.isfinite)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if tensor.dtype not in _EXPONENT_MASKS:
        return int((~torch.isfinite(tensor)).sum())
    int_dtype, bits_dtype, mask = _EXPONENT_MASKS[tensor.dtype]
    bits = tensor.contiguous().view(int_dtype).reshape(-1).numpy().view(bits_dtype)
    return int(_count_all_set(bits, bits_dtype(mask)))


def nonfinite_counter(tensor: torch.Tensor) -> Callable[[], int]:
    """count_nonfinite of `tensor`'s current values, with its bit view made once: for a buffer that is checked
    again after each rewrite (a prepared Retrieve's queries)."""
    if tensor.dtype not in _EXPONENT_MASKS or not tensor.is_contiguous() or tensor.numel() == 0:
        return lambda: count_nonfinite(tensor)
    int_dtype, bits_dtype, mask = _EXPONENT_MASKS[tensor.dtype]
    bits = tensor.view(int_dtype).reshape(-1).numpy().view(bits_dtype)
    exponent = bits_dtype(mask)
    return lambda: int(_count_all_set(bits, exponent))


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _max_norm_sq_bf16(bits: np.ndarray, out: np.ndarray) -> None:
    heads, n, d = bits.shape
    row = np.empty(d, np.float32)
    as_bits = row.view(np.uint32)
    for h in range(heads):
        best = np.float32(0.0)
        for t in range(n):
            for c in range(d):
                as_bits[c] = np.uint32(bits[h, t, c]) << 16
            acc = np.float32(0.0)
            for c in range(d):
                acc += row[c] * row[c]
            best = max(best, acc)
        out[h] = best


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _max_norm_sq_f32(keys: np.ndarray, out: np.ndarray) -> None:
    heads, n, d = keys.shape
    for h in range(heads):
        best = np.float32(0.0)
        for t in range(n):
            acc = np.float32(0.0)
            for c in range(d):
                acc += keys[h, t, c] * keys[h, t, c]
            best = max(best, acc)
        out[h] = best


def max_key_norm(keys: torch.Tensor) -> torch.Tensor:
    """max over tokens of |k| per KV head: keys [Hkv, n, d] -> float32 [Hkv] (zeros when n == 0)."""
    if keys.shape[1] == 0:
        return torch.zeros(keys.shape[0])
    # float32 sums of squares round: the result is nudged up so that it stays a bound (the exact scan relies on it)
    if keys.dtype not in (torch.bfloat16, torch.float32) or keys.stride(-1) != 1:
        return (keys.double().norm(dim=-1).amax(dim=1) * (1 + 1e-5)).float()
    out = np.empty(keys.shape[0], np.float32)
    if keys.dtype == torch.bfloat16:
        _max_norm_sq_bf16(keys.view(torch.int16).numpy().view(np.uint16), out)
    else:
        _max_norm_sq_f32(keys.numpy(), out)
    return torch.from_numpy(np.sqrt(out.astype(np.float64)) * (1 + 1e-5)).float()


def warmup() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        count_nonfinite(torch.zeros(4, dtype=dtype))
    for dtype in (torch.bfloat16, torch.float32):
        max_key_norm(torch.ones(1, 2, 4, dtype=dtype))
