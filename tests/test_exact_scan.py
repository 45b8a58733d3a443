"""The exact scan equals brute force: the compiled single pass (bf16/fp32 stores, split over threads) and the
16-bit coarse scan with float32 rescoring and a proven bound (fp16 stores), including on near-tied scores
(which force the coarse scan's float32 fallback)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvd.index.flat import exact_topk
from tests.reference import brute_topk


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_scan_equals_brute_force(dtype):
    g = torch.Generator().manual_seed(0)
    keys = (torch.randn(2, 20000, 32, generator=g) * 2).to(dtype)
    queries = torch.randn(8, 32, generator=g)
    with ThreadPoolExecutor(3) as pool:
        ids, scores = exact_topk(queries, keys, 50, 100, 19000, pool=pool)
    assert ids.tolist() == brute_topk(queries, keys, 50, 100, 19000)
    reference = torch.einsum("hd,hnd->hn", queries.double(), keys.double().repeat_interleave(4, 0))
    torch.testing.assert_close(scores.double(), torch.gather(reference, 1, ids), rtol=1e-5, atol=1e-4)


def test_near_ties_take_the_proven_fallback():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 1, 16, generator=g)
    # Thousands of keys whose scores differ below bf16 resolution: coarse ranking is meaningless there.
    keys = (base + 2e-2 * torch.randn(1, 8000, 16, generator=g)).to(torch.bfloat16)
    queries = base[0].clone()
    ids, _ = exact_topk(queries, keys, 10, pool=None)
    # Compare the float64 scores of the chosen keys with the true top-10 scores (robust to exact ties).
    truth = (keys[0].double() @ queries[0].double())
    chosen = truth[ids[0]]
    best = torch.sort(truth, descending=True).values[:10]
    torch.testing.assert_close(chosen, best, rtol=0, atol=1e-9)


def test_k_larger_than_range_returns_everything_in_order():
    keys = torch.randn(1, 30, 8).to(torch.bfloat16)
    queries = torch.randn(2, 8)
    ids, _ = exact_topk(queries, keys, 100, 5, 25)
    assert ids.shape == (2, 20)
    assert ids.tolist() == brute_topk(queries, keys, 20, 5, 25)


def test_k_larger_than_a_scan_task_keeps_every_key():
    """A layer large enough to be split into tasks, with k larger than a task's share of the keys."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 40000, 16, generator=g).to(torch.bfloat16)
    queries = torch.randn(4, 16, generator=g)
    ids, scores = exact_topk(queries, keys, 30000, 1000, 40000)
    assert ids.shape == (4, 30000) and bool((ids >= 1000).all())
    assert all(len(set(row.tolist())) == 30000 for row in ids)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    # the chosen keys' float64 scores are the 30000 best (rankings may differ only among float32 near-ties)
    truth = torch.einsum("hd,hnd->hn", queries.double(), keys.double().repeat_interleave(2, 0)[:, 1000:])
    for h in range(4):
        best = torch.sort(truth[h], descending=True).values[:30000]
        chosen = torch.sort(truth[h, ids[h] - 1000], descending=True).values
        torch.testing.assert_close(chosen, best, rtol=0, atol=1e-5)
