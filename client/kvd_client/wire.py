"""Conversions between torch/numpy tensors and kvd.v1.Tensor messages (inline bytes or shared memory)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvd.v1 import kvd_pb2 as pb

TORCH_BY_WIRE: dict[int, torch.dtype] = {
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.FLOAT32: torch.float32,
    pb.INT64: torch.int64,
    pb.INT32: torch.int32,
    pb.UINT8: torch.uint8,
}
WIRE_BY_TORCH: dict[torch.dtype, int] = {v: k for k, v in TORCH_BY_WIRE.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def as_torch(array: Any) -> torch.Tensor:
    """Accept a torch tensor or anything numpy understands; returns a CPU tensor (no copy when possible)."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu() if array.device.type != "cpu" else array.detach()
    return torch.from_numpy(np.ascontiguousarray(array))


def to_dtype(dtype: torch.dtype | str | int) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, int):
        return TORCH_BY_WIRE[dtype]
    try:
        return DTYPE_NAMES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}") from None


def byte_size(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    tensor = tensor.contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


def encode_inline(tensor: torch.Tensor) -> pb.Tensor:
    tensor = as_torch(tensor).contiguous()
    if tensor.dtype not in WIRE_BY_TORCH:
        raise ValueError(f"dtype {tensor.dtype} cannot travel on the wire")
    return pb.Tensor(dtype=WIRE_BY_TORCH[tensor.dtype], shape=list(tensor.shape), inline=bytes(tensor_bytes(tensor)))


def decode_bytes(buffer: Any, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor viewing `buffer` (bytes-like of exactly the right size)."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count).reshape(tuple(shape))


def describe(message: pb.Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
    if message.dtype not in TORCH_BY_WIRE:
        raise ValueError(f"tensor has unknown dtype {message.dtype}")
    shape = tuple(int(s) for s in message.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor shape {shape} has a negative dimension")
    return TORCH_BY_WIRE[message.dtype], shape


def place(tensor: torch.Tensor, region_buffer: memoryview, offset: int) -> torch.Tensor:
    """Copy `tensor` into a region buffer at offset; returns the view written."""
    nbytes = tensor.numel() * tensor.element_size()
    target = decode_bytes(region_buffer[offset: offset + nbytes], tensor.dtype, tensor.shape)
    target.copy_(tensor)
    return target


def align(offset: int, alignment: int = 64) -> int:
    return (offset + alignment - 1) // alignment * alignment
