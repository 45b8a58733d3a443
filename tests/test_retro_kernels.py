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
