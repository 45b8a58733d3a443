"""A small self-describing container for named tensors: no pickle.

Layout: MAGIC (8 bytes) | header length (uint64 little endian) | header (UTF-8 JSON) | raw arrays.
The header holds `meta` (any JSON object) and, per array, its name, dtype, shape and byte offset from the
start of the raw section. Arrays are stored C-contiguous, little endian, each 64-byte aligned; bfloat16
(which numpy lacks) is stored as its raw 16-bit patterns.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch

MAGIC = b"KVDTNS1\n"
_ALIGN = 64
_DTYPES = {"float32", "float16", "int64", "int32", "int16", "uint8", "bool"}
_BF16 = "bfloat16"


def _as_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), _BF16
    arr = t.numpy()
    return arr, arr.dtype.name


def pack(meta: dict[str, Any], arrays: dict[str, torch.Tensor]) -> bytes:
    """Serialize meta (JSON-able) and named tensors into one bytes object."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for name, tensor in arrays.items():
        arr, dtype_name = _as_numpy(tensor)
        if dtype_name not in _DTYPES and dtype_name != _BF16:
            raise TypeError(f"unsupported dtype {arr.dtype} for {name}")
        pad = (-offset) % _ALIGN
        blobs.append(b"\0" * pad)
        offset += pad
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append({"name": name, "dtype": dtype_name, "shape": list(arr.shape),
                        "offset": offset, "nbytes": len(raw)})
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta, "arrays": entries}, sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *blobs])


def unpack(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Inverse of pack: (meta, named tensors). Tensors own their memory (copied out of `data`)."""
    if data[:len(MAGIC)] != MAGIC:
        raise ValueError("not a kvd tensor container (bad magic)")
    (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    header = json.loads(bytes(data[start:start + hlen]).decode())
    raw_start = start + hlen
    arrays: dict[str, torch.Tensor] = {}
    for e in header["arrays"]:
        if e["dtype"] not in _DTYPES and e["dtype"] != _BF16:
            raise ValueError(f"unsupported dtype {e['dtype']}")
        dtype = np.dtype("int16" if e["dtype"] == _BF16 else e["dtype"]).newbyteorder("<")
        count = int(np.prod(e["shape"], dtype=np.int64))
        if e["nbytes"] != count * dtype.itemsize or raw_start + e["offset"] + e["nbytes"] > len(data):
            raise ValueError(f"array {e['name']} is truncated or malformed")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=raw_start + e["offset"])
        t = torch.from_numpy(arr.reshape(e["shape"]).astype(dtype.newbyteorder("=")))
        arrays[e["name"]] = t.view(torch.bfloat16) if e["dtype"] == _BF16 else t
    return header["meta"], arrays
