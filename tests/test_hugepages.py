"""kvd.hugepages: large fresh buffers ask for transparent huge pages; small ones and a switched-off daemon do not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvd import hugepages
from kvd.store.layer_kv import LayerKV


def _thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_large_buffers_ask_and_small_ones_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not hugepages.advise(torch.empty(1 << 20, dtype=torch.uint8))   # 1 MiB: below MIN_BYTES
    big = torch.empty(64 << 20, dtype=torch.uint8)
    accepted = hugepages.advise(big)  # never raises, also where the kernel has no THP
    if "[always]" in _thp_mode() or "[madvise]" in _thp_mode():  # CI's and this machine's kernels: madvise
        assert accepted
        before = _anon_huge_kib()
        big.fill_(1)  # first touch: 2 MiB pages where the kernel finds free ones
        assert _anon_huge_kib() > before
    monkeypatch.setattr(hugepages, "ENABLED", False)
    assert not hugepages.advise(torch.empty(64 << 20, dtype=torch.uint8))
    assert not hugepages.advise(np.empty(64 << 20, dtype=np.uint8))


def test_stores_keep_their_contents_across_growth() -> None:
    """The advice is given before a reallocated store is written: what was appended is all still there."""
    layer = LayerKV(8, 128, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(8, 3000, 128, generator=gen).bfloat16() for _ in range(8)]  # grows past MIN_BYTES
    for chunk in chunks:
        layer.append(chunk, -chunk)
    keys, values = layer.view()
    assert torch.equal(keys, torch.cat(chunks, dim=1)) and torch.equal(values, -torch.cat(chunks, dim=1))
