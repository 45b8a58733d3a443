"""The compiled retrieval kernels against float32 torch references (scores of chosen keys; attention over
chosen values), for bf16 and float32 stores, padded ids and heads without any key."""

import math

import pytest
import torch

from kvd import gather_kernels


def _case(dtype: torch.dtype, n: int = 500, kv_heads: int = 2, group: int = 3, d: int = 64, m: int = 40):
    gen = torch.Generator().manual_seed(7)
    # stores are prefix views of larger buffers, as a session's layer is
    keys = (torch.randn(kv_heads, n + 30, d, generator=gen) * 2).to(dtype)[:, :n]
    values = torch.randn(kv_heads, n + 30, d, generator=gen).to(dtype)[:, :n]
    queries = torch.randn(kv_heads * group, d, generator=gen)
    ids = torch.randint(0, n, (kv_heads * group, m), generator=gen)
    ids[1, m // 2:] = -1        # a padded head
    ids[4, :] = -1              # a head with no key at all
    return keys, values, queries, ids


def _reference(keys, values, queries, ids, scale):
    group = queries.shape[0] // keys.shape[0]
    heads = (torch.arange(queries.shape[0]) // group).unsqueeze(1)
    rows_k = keys[heads, ids.clamp(min=0)].double()
    rows_v = values[heads, ids.clamp(min=0)].double()
    scores = torch.einsum("hmd,hd->hm", rows_k, queries.double()).masked_fill(ids < 0, -math.inf)
    lse = torch.logsumexp(scores * scale, dim=1)
    weights = torch.exp(scores * scale - lse.unsqueeze(1)).nan_to_num(0.0)
    out = torch.einsum("hm,hmd->hd", weights, rows_v)
    return scores, out, lse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kv_heads,group,m", [(2, 3, 40), (2, 3, 200), (8, 4, 100)])  # 1, 2 and 4 head chunks
def test_kernels_match_float64_reference(dtype, kv_heads, group, m):
    keys, values, queries, ids = _case(dtype, kv_heads=kv_heads, group=group, m=m)
    assert gather_kernels.supported(keys)
    scale = 0.125
    ref_scores, ref_out, ref_lse = _reference(keys, values, queries, ids, scale)
    scores = gather_kernels.score_rows(keys, queries, ids)
    assert scores.dtype == torch.float32 and scores.shape == ids.shape
    assert torch.equal(torch.isneginf(scores), ids < 0)
    valid = ids >= 0
    torch.testing.assert_close(scores[valid].double(), ref_scores[valid], rtol=1e-5, atol=1e-4)
    out, lse = gather_kernels.attend_rows(values, ids, scores, scale)
    assert torch.isneginf(lse[4]) and torch.all(out[4] == 0)
    live = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[live].double(), ref_lse[live], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


def test_fp16_and_column_strided_stores_are_left_to_torch():
    assert not gather_kernels.supported(torch.zeros(2, 8, 4, dtype=torch.float16))
    assert not gather_kernels.supported(torch.zeros(2, 4, 8).transpose(1, 2))


def test_store_array_exposes_a_prefix_view_as_its_whole_buffer():
    """A session's store is rows [0, n) of a larger buffer: the kernels get the buffer itself (C-contiguous, the
    same bits at every stored row), not a strided view; views they cannot widen that way stay strided."""
    buffer = torch.randn(3, 50, 8).bfloat16()
    array = gather_kernels.store_array(buffer[:, :20])
    assert array.flags.c_contiguous and array.shape == (3, 50, 8)
    assert (array[:, :20] == buffer[:, :20].view(torch.int16).numpy().view(array.dtype)).all()
    tail = gather_kernels.store_array(buffer[:, 30:])  # the whole buffer would run past the storage
    assert tail.shape == (3, 20, 8) and not tail.flags.c_contiguous
    assert (tail == buffer[:, 30:].view(torch.int16).numpy().view(tail.dtype)).all()
