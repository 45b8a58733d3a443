"""kvd.retro's fused kernel (the current query's partial attention plus the past queries' over their newly seen
keys, one pass over the retrieved rows) against gather_kernels.attend_rows (bit for bit) and the torch path."""

import pytest
import torch

from kvd import gather_kernels, retro


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [1, 3])
def test_fused_kernel_matches_separate_paths(dtype: torch.dtype, count: int) -> None:
    gen = torch.Generator().manual_seed(count)
    kv_heads, group, d, n, m = 2, 3, 64, 300, 40
    heads = kv_heads * group
    # stores are prefix views of larger buffers, as a session's layer is
    keys = (torch.randn(kv_heads, n + 20, d, generator=gen) * 2).to(dtype)[:, :n]
    values = torch.randn(kv_heads, n + 20, d, generator=gen).to(dtype)[:, :n]
    assert retro.fused(keys, values)
    ids = torch.randint(0, n, (heads, m), generator=gen)
    ids[1, m // 2:] = -1  # a padded head
    ids[4] = -1           # a head without keys
    scores = gather_kernels.score_rows(keys, torch.randn(heads, d, generator=gen), ids)
    seen = torch.randint(-1, n, (count, heads, 50), generator=gen)
    seen[0, 2, :m] = ids[2]  # a past query head that has seen everything
    cases = [retro.PastQueries(torch.randn(count, heads, d, generator=gen), seen,
                               torch.randint(n // 2, n + 1, (count,), generator=gen)),
             retro.PastQueries(torch.randn(count, heads, d, generator=gen), None, None)]
    for past in cases:
        out, lse, past_out, past_lse = retro.attend_rows_past(keys, values, ids, scores, 0.125, past)
        ref_out, ref_lse = gather_kernels.attend_rows(values, ids, scores, 0.125)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        ref_past_out, ref_past_lse = retro.attend_past(keys, values, ids, past, 0.125)
        assert torch.equal(torch.isneginf(past_lse), torch.isneginf(ref_past_lse))
        assert torch.isneginf(past_lse[:, 4]).all() and not past_out[:, 4].any()
        live = torch.isfinite(ref_past_lse)
        assert live.any()
        torch.testing.assert_close(past_lse[live], ref_past_lse[live], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(past_out, ref_past_out, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(retro.attend_rows_past(keys, values, ids, scores, 0.125, cases[0])[3][0, 2])


def _case(dtype: torch.dtype, count: int, seed: int, m: int = 40, heads_per_kv: int = 4):
    gen = torch.Generator().manual_seed(seed)
    kv_heads, d, n = 2, 32, 400
    heads = kv_heads * heads_per_kv
    keys = (torch.randn(kv_heads, n + 8, d, generator=gen) * 2).to(dtype)[:, :n]
    values = torch.randn(kv_heads, n + 8, d, generator=gen).to(dtype)[:, :n]
    ids = torch.randint(0, n, (heads, m), generator=gen)
    ids[1, m // 3:] = -1
    scores = gather_kernels.score_rows(keys, torch.randn(heads, d, generator=gen), ids)
    seen = torch.randint(-1, n, (count, heads, 2 * m), generator=gen)
    past = retro.PastQueries(torch.randn(count, heads, d, generator=gen), seen,
                             torch.randint(n // 2, n + 1, (count,), generator=gen))
    return keys, values, ids, scores, past


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("count", [1, 3, 7])  # w = 2, 4, 8
def test_threaded_kernel_equals_serial(dtype: torch.dtype, count: int) -> None:
    keys, values, ids, scores, past = _case(dtype, count, seed=10 + count)
    serial = retro.attend_rows_past(keys, values, ids, scores, 0.2, past, threads=1)
    for threads in (2, 3, 5, 64):
        got = retro.attend_rows_past(keys, values, ids, scores, 0.2, past, threads=threads)
        for a, b in zip(serial, got, strict=True):
            assert torch.equal(a, b)
    ref_out, ref_lse = gather_kernels.attend_rows(values, ids, scores, 0.2)
    assert torch.equal(serial[0], ref_out) and torch.equal(serial[1], ref_lse)


@pytest.mark.parametrize("threads", [1, 4])
def test_no_newly_seen_rows(threads: int) -> None:
    """Every retrieved row seen already (or at/after the bound): -inf and zeros for the past queries, the current
    query's result unchanged."""
    keys, values, ids, scores, past = _case(torch.bfloat16, 2, seed=3)
    seen_all = retro.PastQueries(past.queries, ids.unsqueeze(0).expand(2, -1, -1).contiguous(), None)
    behind = retro.PastQueries(past.queries, None, torch.zeros(2, dtype=torch.int64))
    ref_out, ref_lse = gather_kernels.attend_rows(values, ids, scores, 0.2)
    for case in (seen_all, behind):
        out, lse, past_out, past_lse = retro.attend_rows_past(keys, values, ids, scores, 0.2, case, threads=threads)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        assert torch.isneginf(past_lse).all() and not past_out.any()


def test_w8_many_rows_matches_torch_path() -> None:
    """P = 7 past queries (w = 8), k = 300 rows with 7 x k seen ids each, on the default thread count."""
    keys, values, ids, scores, past = _case(torch.bfloat16, 7, seed=8, m=300)
    *_, past_out, past_lse = retro.attend_rows_past(keys, values, ids, scores, 0.2, past)
    ref_out, ref_lse = retro.attend_past(keys, values, ids, past, 0.2)
    assert torch.equal(torch.isneginf(past_lse), torch.isneginf(ref_lse))
    live = torch.isfinite(ref_lse)
    assert live.any()
    torch.testing.assert_close(past_lse[live], ref_lse[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(past_out, ref_out, rtol=1e-5, atol=1e-5)


def test_share_ranges_covers_once_and_raises() -> None:
    for total, threads in ((32, 6), (5, 8), (1, 4), (33, 2), (7, 1)):
        hits = torch.zeros(total, dtype=torch.int64)

        def mark(lo: int, hi: int, hits: torch.Tensor = hits) -> None:
            hits[lo:hi] += 1

        retro.share_ranges(mark, total, threads)
        assert torch.equal(hits, torch.ones(total, dtype=torch.int64))

    def fail(lo: int, hi: int) -> None:
        if lo <= 20 < hi:
            raise ValueError("range 20")

    with pytest.raises(ValueError, match="range 20"):
        retro.share_ranges(fail, 32, 4)


def test_threads_for() -> None:
    assert retro.threads_for(32, 1, 0) == 1
    assert 1 <= retro.threads_for(32, 100, 1) <= min(32, retro.max_threads())
    assert retro.threads_for(2, 10000, 7) <= 2
