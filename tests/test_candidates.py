"""Retrieve with candidate positions (lookahead): the top-k of the given positions by exact q.k, against
brute force over the same set, on the real daemon."""

from __future__ import annotations

import pytest
import torch
from kvd_client import InvalidArgumentError

HKV, HQ, D, N = 2, 4, 32, 600


def session(client, sid: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(HKV, N, D, generator=gen).to(dtype)
    values = torch.randn(HKV, N, D, generator=gen).to(dtype)
    client.create_session(sid, num_layers=1, num_kv_heads=HKV, num_query_heads=HQ, head_dim=D, dtype=dtype)
    client.append(sid, 0, keys.unsqueeze(0), values.unsqueeze(0))
    return keys, values


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, candidates: torch.Tensor, k: int,
              begin: int, end: int, scale: float) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Per query head: the k best distinct candidates in [begin, end) by float64 q.k, and float64 attention."""
    chosen, outputs, lses = [], [], []
    for h in range(HQ):
        pool = sorted({int(p) for p in candidates[h].tolist() if begin <= p < end})
        kh, vh = keys[h // (HQ // HKV)].double(), values[h // (HQ // HKV)].double()
        scores = kh[pool] @ q[h].double()
        order = torch.argsort(scores, descending=True)[:k]
        ids = [pool[i] for i in order.tolist()]
        logits = (kh[ids] @ q[h].double()) * scale
        chosen.append(ids)
        outputs.append(torch.softmax(logits, 0) @ vh[ids])
        lses.append(torch.logsumexp(logits, 0))
    return chosen, torch.stack(outputs), torch.stack(lses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_of_candidates_equals_brute_force_over_them(shared_daemon, dtype: torch.dtype) -> None:
    client = shared_daemon.client()
    sids = [f"cand-{str(dtype)[6:]}-{i}" for i in range(2)]
    data = [session(client, sid, dtype, seed=i) for i, sid in enumerate(sids)]
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, HQ, D, generator=gen)
    candidates = torch.randint(0, N, (2, HQ, 40), generator=gen)
    candidates[:, :, :5] = candidates[:, :, 5:10]   # repeats count once
    candidates[:, :, -3:] = -1                       # none
    ranges = [(10, 500), (0, 0)]                     # out-of-range positions are left out
    k, scale = 12, D ** -0.5
    res = client.retrieve(sids, 0, q, k=k, mode="attention", ranges=ranges, scale=scale, candidates=candidates)
    assert res.index_kinds == ["candidates", "candidates"]
    for i, (keys, values) in enumerate(data):
        begin, end = ranges[i][0], ranges[i][1] or N
        ids, output, lse = reference(q[i], keys, values, candidates[i], k, begin, end, scale)
        assert res.ids[i].tolist() == [row + [-1] * (k - len(row)) for row in ids]
        torch.testing.assert_close(res.output[i].double(), output, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.lse[i].double(), lse, rtol=1e-6, atol=1e-6)
    for sid in sids:
        client.delete_session(sid)
    client.close()


def test_every_position_as_candidate_equals_the_exact_scan(shared_daemon) -> None:
    client = shared_daemon.client()
    session(client, "cand-all")
    q = torch.randn(HQ, D, generator=torch.Generator().manual_seed(3))
    everything = torch.arange(N).repeat(HQ, 1).flip(1)
    got = client.retrieve("cand-all", 0, q, k=20, mode="attention", candidates=everything)
    exact = client.retrieve("cand-all", 0, q, k=20, mode="attention", exact=True)
    assert torch.equal(got.ids, exact.ids)
    torch.testing.assert_close(got.output, exact.output, rtol=1e-6, atol=1e-6)
    ids_only = client.retrieve("cand-all", 0, q, k=20, mode="ids", candidates=everything[:, -50:])
    assert ids_only.ids.shape == (HQ, 20) and bool((ids_only.ids < 50).all()) and bool((ids_only.ids >= 0).all())
    client.delete_session("cand-all")
    client.close()


def test_bad_candidates_are_refused(shared_daemon) -> None:
    client = shared_daemon.client()
    session(client, "cand-bad")
    q = torch.randn(HQ, D)
    with pytest.raises(InvalidArgumentError, match="candidates must be"):
        client.retrieve("cand-bad", 0, q, k=5, candidates=torch.zeros(HQ + 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="int32 or int64"):
        client.retrieve("cand-bad", 0, q, k=5, candidates=torch.zeros(HQ, 3))
    with pytest.raises(InvalidArgumentError, match="past queries"):
        client.retrieve("cand-bad", 0, q, k=5, candidates=torch.zeros(HQ, 3, dtype=torch.int64),
                        past_queries=q.unsqueeze(0))
    client.delete_session("cand-bad")
    client.close()
