"""Parallel regions (kvd.parallel) against the worker-pool path: each kernel computes every head the same way
either way, so the results must be identical, bit for bit, and both must match an independent reference."""

import math

import numpy as np
import pytest
import torch

from kvd import gather_kernels, parallel, retro, scan_kernels
from kvd.index import graph
from kvd.retro import PastQueries


@pytest.fixture(params=[True, False], ids=["region", "pool"])
def region(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param and not parallel.LAYER:
        pytest.fail("no thread-safe numba threading layer (OpenMP/TBB) on this machine: regions cannot be tested")
    monkeypatch.setattr(parallel, "ENABLED", request.param)
    return request.param


def _store(n: int, dtype: torch.dtype, seed: int, kv_heads: int = 8, d: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(kv_heads, n + 40, d, generator=gen) * 1.5).to(dtype)[:, :n]  # a session's prefix view


def test_this_machine_runs_regions() -> None:
    """CI's machine has GNU OpenMP: the fast path is the one tested (a fallback-only run would hide it)."""
    assert parallel.LAYER in ("omp", "tbb")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [300, 5000])
def test_exact_scan_equals_brute_force(region: bool, dtype: torch.dtype, n: int) -> None:
    keys = _store(n, dtype, 1)
    queries = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    begin, end = 7, n - 11
    ids, scores = scan_kernels.scan_topk(queries, keys, 50, begin, end)
    group = 4
    full = torch.einsum("hnd,hd->hn", keys.float().repeat_interleave(group, 0)[:, begin:end], queries)
    want_scores, want_ids = torch.topk(full, 50, dim=1)
    assert torch.allclose(scores, want_scores, rtol=1e-5, atol=1e-4)
    # ties aside, the same positions in the same order
    same = ids == want_ids + begin
    assert same.float().mean() > 0.99
    assert torch.allclose(torch.gather(full, 1, ids - begin), scores, rtol=1e-5, atol=1e-4)


def test_scan_regions_and_pool_agree_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _store(6000, torch.bfloat16, 3)
    queries = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(parallel, "ENABLED", enabled)
        results.append(scan_kernels.scan_topk(queries, keys, 100, 0, 6000))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_over_chosen_rows_matches_float64(region: bool, dtype: torch.dtype) -> None:
    values = _store(3000, dtype, 5)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 3000, (32, 100), generator=gen)
    ids[3, 50:] = -1
    ids[9] = -1
    scores = torch.randn(32, 100, generator=gen) * 4
    out, lse = gather_kernels.attend_rows(values, ids, scores, 0.125)
    heads = (torch.arange(32) // 4).unsqueeze(1)
    s = (scores.double() * 0.125).masked_fill(ids < 0, -math.inf)
    want_lse = torch.logsumexp(s, dim=1)
    weights = torch.exp(s - want_lse.unsqueeze(1)).nan_to_num(0.0)
    want = torch.einsum("hm,hmd->hd", weights, values[heads, ids.clamp(min=0)].double())
    assert torch.allclose(out.double(), want, atol=1e-5)
    live = ~torch.isinf(want_lse)
    assert torch.allclose(lse.double()[live], want_lse[live], atol=1e-5)
    assert torch.isinf(lse[9]) and torch.all(out[9] == 0)


def test_candidates_and_retro_regions_and_pool_agree_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    keys, values = _store(4000, torch.bfloat16, 7), _store(4000, torch.bfloat16, 8)
    gen = torch.Generator().manual_seed(9)
    queries = torch.randn(32, 64, generator=gen)
    candidates = torch.randint(-1, 4000, (32, 512), generator=gen)
    ids = torch.randint(0, 4000, (32, 100), generator=gen)
    scores = torch.randn(32, 100, generator=gen)
    past = PastQueries(torch.randn(2, 32, 64, generator=gen), torch.randint(0, 4000, (2, 32, 60), generator=gen),
                       torch.tensor([60, 30]))
    got = []
    for enabled in (True, False):
        monkeypatch.setattr(parallel, "ENABLED", enabled)
        got.append((*scan_kernels.candidate_topk(queries, keys, candidates, 100, 10, 3990),
                    *retro.attend_rows_past(keys, values, ids, scores, 0.125, past)))
    for a, b in zip(*got, strict=True):
        assert torch.equal(a, b)


def test_thread_counts_change_no_scan_candidate_or_attention_result() -> None:
    """A Retrieve's search param `threads` sizes the exact scan's, the candidate scoring's and the attention's
    regions: each head is still computed the same way."""
    keys, values = _store(4000, torch.bfloat16, 10), _store(4000, torch.bfloat16, 11)
    gen = torch.Generator().manual_seed(12)
    queries = torch.randn(32, 64, generator=gen)
    candidates = torch.randint(-1, 4000, (32, 512), generator=gen)
    want_ids, want_scores = scan_kernels.candidate_topk(queries, keys, candidates, 100, 0, 4000)
    want_out, want_lse = gather_kernels.attend_rows(values, want_ids, want_scores, 0.125)
    want_scan = scan_kernels.scan_topk(queries, keys, 100, 5, 3990)
    for threads in (1, 2, 3, 64):
        ids, scores = scan_kernels.candidate_topk(queries, keys, candidates, 100, 0, 4000, threads)
        out, lse = gather_kernels.attend_rows(values, ids, scores, 0.125, threads)
        assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        scan = scan_kernels.scan_topk(queries, keys, 100, 5, 3990, threads)
        assert torch.equal(scan[0], want_scan[0]) and torch.equal(scan[1], want_scan[1])


def test_search_scratch_grows_ahead() -> None:
    visited, _ = graph._search_scratch(1000, 3, 100, 128, 33)
    assert visited.shape[0] >= 3 and visited.shape[1] * 64 >= 1000 and visited.dtype == np.uint64
    again, _ = graph._search_scratch(1001, 3, 100, 128, 33)
    assert again is visited  # decode adds one key at a time: no reallocation per step
