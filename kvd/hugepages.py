"""Transparent huge pages for the large buffers that retrieval reads at random (KV stores, graph rows).

A decode Retrieve reads a few thousand scattered rows of a layer's store (256 MiB per layer at 128K tokens of an
8B-shaped model). With 4 KiB pages nearly every such read also misses the TLB, and a beam search's reads depend
on each other; `bench/hugepage_probe.py` measures what 2 MiB pages change on a host. Hosts whose THP mode is
"madvise" (a common default) give huge pages only to memory that asks for them before it is first touched:
`advise` does that for one fresh buffer. Small buffers are left alone (each huge page is backed in full once
touched), as is everything where the call is unavailable. `storage.huge_pages` (on by default) switches it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import numpy as np
import torch

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
MIN_BYTES = 8 << 20  # smaller buffers: at most a few pages, not worth a half-empty huge page at their end

ENABLED = sys.platform == "linux"
_madvise = None


def _libc_madvise() -> Any:  # a ctypes function, or False where there is none
    global _madvise
    if _madvise is None:
        name = ctypes.util.find_library("c")
        func = getattr(ctypes.CDLL(name, use_errno=True), "madvise", None) if name else None
        if func is not None:
            func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            func.restype = ctypes.c_int
        _madvise = func or False
    return _madvise


def advise(buffer: torch.Tensor | np.ndarray) -> bool:
    """Ask for huge pages over the 2 MiB-aligned part of a fresh (not yet written) contiguous buffer; returns
    whether the kernel accepted. Never raises: huge pages only change speed."""
    if not ENABLED:
        return False
    if isinstance(buffer, torch.Tensor):
        address, size = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    else:
        address, size = buffer.ctypes.data, buffer.nbytes
    if size < MIN_BYTES:
        return False
    begin = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + size) // HUGE_PAGE * HUGE_PAGE
    func = _libc_madvise()
    if not func or end <= begin:
        return False
    return func(begin, end - begin, MADV_HUGEPAGE) == 0
