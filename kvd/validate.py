"""Checks on request contents that turn bad input into INVALID_ARGUMENT with a precise message."""

from __future__ import annotations

import math

import torch

from kvd.errors import InvalidArgument

MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_K = 1 << 16
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_shape(what: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise InvalidArgument(f"{what} has shape {list(tensor.shape)}, expected {list(expected)}")


def check_dtype(what: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise InvalidArgument(f"{what} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {names}")


# A float is NaN or infinite exactly when all its exponent bits are set. Testing the bits as integers is
# many times faster than torch.isfinite on 16-bit floats on the CPU.
_EXPONENT_BITS = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
                  torch.float32: (torch.int32, 0x7F800000)}


_CHECK_SLICE = 1 << 20


def count_nonfinite(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    if tensor.dtype not in _EXPONENT_BITS:
        return int((~torch.isfinite(tensor)).sum())
    int_dtype, mask = _EXPONENT_BITS[tensor.dtype]
    bits = tensor.contiguous().view(int_dtype).reshape(-1)
    bad = 0
    # In slices, so that checking a large append needs little temporary memory.
    for start in range(0, bits.numel(), _CHECK_SLICE):
        exponent = torch.bitwise_and(bits[start: start + _CHECK_SLICE], mask)
        bad += int((exponent == mask).sum())
    return bad


def check_finite(what: str, tensor: torch.Tensor) -> None:
    bad = count_nonfinite(tensor)
    if bad:
        raise InvalidArgument(f"{what} contains {bad} NaN or infinite values")


def check_range(what: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(f"{what} = {value} is out of range [{low}, {high}]")
    return value


def check_scale(scale: float) -> float:
    if scale < 0 or not math.isfinite(scale):
        raise InvalidArgument(f"scale = {scale} must be a positive finite number (0 for 1/sqrt(head_dim))")
    return scale
