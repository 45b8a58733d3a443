"""Checks on request contents that turn bad input into INVALID_ARGUMENT with a precise message."""

from __future__ import annotations

import math

import torch

from kvd import ingest_kernels
from kvd.errors import InvalidArgument

MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_K = 1 << 16
MAX_CANDIDATES = 1 << 16   # candidate positions per query head of one Retrieve
MAX_THREADS = 1024         # a Retrieve's search param "threads"
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_shape(what: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise InvalidArgument(f"{what} has shape {list(tensor.shape)}, expected {list(expected)}")


def check_dtype(what: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise InvalidArgument(f"{what} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {names}")


def check_finite(what: str, tensor: torch.Tensor) -> None:
    bad = ingest_kernels.count_nonfinite(tensor)
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
