"""Wave index (kvd/index/wave.py): exactness at full budget, the estimation zone's formula and value,
incremental adds, serialization, GQA mapping. References are brute force in float32."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from kvd.index.base import BuildHints, IndexShape
from kvd.index.wave import WaveIndex, WaveParams
from kvd.index.wave_io import pack, unpack

HKV, G, D = 2, 2, 16
HQ = HKV * G
SHAPE = IndexShape(num_kv_heads=HKV, num_query_heads=HQ, head_dim=D)


def clustered(n: int = 640, n_queries: int = 6, n_centers: int = 12, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clustered keys with heavy-tailed norms, values tied to the clusters, and queries offset from the
    keys (a shared offset plus a pull towards one cluster). Returns keys/values [HKV, n, D], decode
    queries [n_queries, HQ, D] and prefill queries [HQ, 64, D]."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(HKV, n_centers, D, generator=gen) * 3.0
    vcenters = torch.randn(HKV, n_centers, D, generator=gen)
    label = torch.randint(0, n_centers, (HKV, n), generator=gen)
    pick = torch.gather(centers, 1, label.unsqueeze(-1).expand(HKV, n, D))
    norm = torch.exp(0.3 * torch.randn(HKV, n, 1, generator=gen))
    keys = (pick + 0.7 * torch.randn(HKV, n, D, generator=gen)) * norm
    values = torch.gather(vcenters, 1, label.unsqueeze(-1).expand(HKV, n, D))
    values = values + 0.3 * torch.randn(HKV, n, D, generator=gen)
    offset = torch.randn(D, generator=gen) * 2.0

    def make_queries(m: int) -> torch.Tensor:
        want = torch.randint(0, n_centers, (HQ, m), generator=gen)
        kv = (torch.arange(HQ) // G).unsqueeze(1)
        return centers[kv, want] * 0.8 + offset + 0.5 * torch.randn(HQ, m, D, generator=gen)

    return keys, values, make_queries(n_queries).transpose(0, 1).contiguous(), make_queries(64)


def brute_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [HQ, D], keys [HKV, n, D] -> [HQ, n] by GQA."""
    return torch.einsum("hd,hnd->hn", q, keys.repeat_interleave(G, 0))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over ids [HQ, m] (-1 padded): (out [HQ, D], lse [HQ])."""
    kv = (torch.arange(HQ) // G).unsqueeze(1)
    s = (keys[kv, ids.clamp_min(0)] @ q.unsqueeze(-1)).squeeze(-1) * scale
    s = s.masked_fill(ids < 0, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    return (p.unsqueeze(-1) * values[kv, ids.clamp_min(0)]).sum(1), lse


def merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    m = torch.maximum(a[1], b[1])
    m = torch.where(torch.isfinite(m), m, 0.0)
    wa, wb = torch.exp(a[1] - m), torch.exp(b[1] - m)
    return (wa.unsqueeze(-1) * a[0] + wb.unsqueeze(-1) * b[0]) / (wa + wb).unsqueeze(-1)


def full_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    p = torch.softmax(brute_scores(q, keys) * scale, -1)
    return torch.einsum("hn,hnd->hd", p, values.repeat_interleave(G, 0))


def build(params: dict[str, str] | None = None, n: int = 640, hints: bool = True, seed: int = 0
          ) -> tuple[WaveIndex, torch.Tensor, torch.Tensor, torch.Tensor]:
    keys, values, queries, prefill = clustered(n, seed=seed)
    idx = WaveIndex(SHAPE, {"segment": "256", **(params or {})})
    idx.build(keys, values, BuildHints(queries=prefill) if hints else None)
    return idx, keys, values, queries


@pytest.mark.parametrize("metric", ["query", "euclid", "spherical"])
@pytest.mark.parametrize("ranking", ["head", "group"])
@pytest.mark.parametrize("leftover", ["ids", "fold", "drop"])
def test_full_budget_is_exact(metric: str, ranking: str, leftover: str) -> None:
    idx, keys, _, queries = build({"metric": metric, "retrieval_fraction": "1", "ranking": ranking,
                                   "leftover": leftover})
    n = keys.shape[1]
    assert idx.count == n and idx.metric == metric
    for q in queries:
        ref = brute_scores(q, keys).argsort(-1, descending=True)
        res = idx.search(q, n + 5, 0.1)
        assert res.ids.shape == (HQ, n + 5)
        assert torch.equal(res.ids[:, :n], ref) and bool((res.ids[:, n:] == -1).all())
        assert res.estimate is not None and bool(torch.isneginf(res.estimate.lse).all())
        assert res.keys_touched == idx.num_clusters + n
        top = idx.search(q, 10, 0.1)   # k < n: still the exact top-k, sorted
        assert torch.equal(top.ids[:, :10], ref[:, :10])


def token_clusters(idx: WaveIndex) -> torch.Tensor:
    """Cluster of every clustered token [HKV, n], from the index's CSR layout."""
    cl = idx._cl
    sizes = cl.offsets[:, 1:] - cl.offsets[:, :-1]
    out = torch.empty(HKV, cl.num_tokens, dtype=torch.int64)
    for h in range(HKV):
        labels = torch.repeat_interleave(torch.arange(cl.num_clusters), sizes[h])
        out[h, cl.token_ids[h].long()] = labels
    return out


def test_leftover_ids_returns_whole_retrieval_clusters() -> None:
    """leftover=ids: the exact top-k first (sorted), then the other tokens of the retrieval-zone clusters;
    every id once, and every cluster either wholly returned or not at all."""
    idx, keys, _, queries = build({"retrieval_fraction": "0.1", "leftover": "ids"})
    lab = token_clusters(idx)
    k = 8
    for q in queries:
        res = idx.search(q, k, 0.1)
        for h in range(HQ):
            got = res.ids[h][res.ids[h] >= 0]
            assert got.unique().numel() == got.numel() > k
            s = keys[h // G, got] @ q[h]
            assert torch.equal(s[:k], s.topk(k).values)
            clusters = lab[h // G, got].unique()
            members = torch.isin(lab[h // G], clusters).nonzero().squeeze(1)
            assert torch.equal(got.sort().values, members)


def test_build_from_labels_matches_build() -> None:
    idx, keys, values, _ = build()
    *_, prefill = clustered()
    again = WaveIndex(SHAPE, {"segment": "256"})
    again.build_from_labels(keys, values, token_clusters(idx), BuildHints(queries=prefill))
    assert again.to_bytes() == idx.to_bytes()
    with pytest.raises(ValueError):
        again.build_from_labels(keys, values, torch.zeros(HKV, 3, dtype=torch.int64))


def test_gqa_mapping() -> None:
    """Query heads 0,1 search KV head 0 and 2,3 KV head 1: the same query gives each group its own keys."""
    idx, keys, _, _ = build({"retrieval_fraction": "1"})
    q = torch.randn(D).expand(HQ, D).contiguous()
    ids = idx.search(q, 5, 0.1).ids
    for h in range(HQ):
        assert torch.equal(ids[h, :5], (keys[h // G] @ q[h]).topk(5).indices)
    assert not torch.equal(ids[0, :5], ids[2, :5])


def test_single_cluster_estimate_matches_formula() -> None:
    """An estimation zone of one cluster (the second-ranked; the first is the retrieval zone) gives
    lse = log(size) + scale * q.mean_key and output = the cluster's mean value."""
    idx, keys, values, queries = build({"retrieval_fraction": "0", "estimation_fraction": "1e-9",
                                        "radius_weight": "0", "leftover": "drop"})
    cl = idx._cl
    members = [[cl.token_ids[h, cl.offsets[h, c]:cl.offsets[h, c + 1]].long() for c in range(idx.num_clusters)]
               for h in range(HKV)]
    assert idx.zone_sizes(1) == (1, 1)
    scale = 0.3
    for q in queries:
        est = idx.search(q, 1, scale).estimate
        assert est is not None
        for h in range(HQ):
            kv = h // G
            means = torch.stack([keys[kv, m].mean(0) if len(m) else torch.full((D,), math.nan)
                                 for m in members[kv]])
            score = torch.nan_to_num(means @ q[h], nan=-math.inf)
            second = int(score.topk(2).indices[1])
            m = members[kv][second]
            lse = math.log(len(m)) + scale * float(keys[kv, m].mean(0) @ q[h])
            assert float(est.lse[h]) == pytest.approx(lse, rel=1e-5, abs=1e-5)
            torch.testing.assert_close(est.output[h], values[kv, m].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("leftover", ["fold", "drop", "ids"])
def test_estimate_lowers_attention_error(leftover: str) -> None:
    """On clustered data, exact attention over the ids merged with the estimate is closer to full attention
    than the ids alone (both measured here)."""
    idx, keys, values, queries = build({"retrieval_fraction": "0.05", "estimation_fraction": "0.5",
                                        "leftover": leftover}, n=2048)
    scale = 0.05
    with_est, without = [], []
    for q in queries:
        ref = full_attention(q, keys, values, scale)
        res = idx.search(q, 16, scale)
        exact = attend(q, keys, values, res.ids, scale)
        assert res.estimate is not None and bool(torch.isfinite(res.estimate.lse).all())
        both = merge(exact, (res.estimate.output, res.estimate.lse))
        with_est.append(float(((both - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()))
        without.append(float(((exact[0] - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()))
    assert sum(with_est) < sum(without)


def test_fold_keeps_the_exact_mass() -> None:
    """leftover=fold with every cluster retrieved: the zone tokens outside the top-k enter the estimate with
    their exact scores, so ids and estimate split the keys and their merged log-sum-exp is the full one."""
    idx, keys, _, queries = build({"retrieval_fraction": "1", "estimation_fraction": "0", "leftover": "fold"})
    scale = 0.05
    for q in queries:
        res = idx.search(q, 16, scale)
        assert res.estimate is not None and res.ids.shape == (HQ, 16)
        s = brute_scores(q, keys) * scale
        top = torch.gather(s, 1, res.ids)
        rest = s.scatter(1, res.ids, -math.inf)
        torch.testing.assert_close(res.estimate.lse, torch.logsumexp(rest, -1))
        merged = torch.logaddexp(torch.logsumexp(top, -1), res.estimate.lse)
        torch.testing.assert_close(merged, torch.logsumexp(s, -1))


def test_added_tokens_are_found() -> None:
    idx, keys, _, queries = build({"pending_threshold": "64"})
    n = keys.shape[1]
    q = queries[0]
    gen = torch.Generator().manual_seed(5)
    # New keys: one per KV head aligned with that group's first query head, far above every old score.
    new_k = torch.randn(HKV, 10, D, generator=gen) * 0.1
    new_v = torch.randn(HKV, 10, D, generator=gen)
    for kv in range(HKV):
        new_k[kv, 3] = q[kv * G] / q[kv * G].norm() * 100.0
    idx.add(new_k, new_v)
    assert idx.count == n + 10 and idx.num_clusters > 0
    res = idx.search(q, 5, 0.1)
    for kv in range(HKV):
        assert int(res.ids[kv * G, 0]) == n + 3
    assert res.keys_touched >= idx.num_clusters + 10   # pending keys are always scored
    # Past the threshold the pending tokens are clustered and appended: still found, ids continue.
    more_k = torch.randn(HKV, 60, D, generator=gen) * 0.1
    idx.add(more_k, torch.randn(HKV, 60, D, generator=gen))
    assert idx.count == n + 70 and idx._pend_k.shape[1] == 70 - 64
    all_k = torch.cat([keys, new_k, more_k], 1)
    exact = idx.search(q, 5, 0.1, {"retrieval_fraction": "1"}).ids
    for h in range(HQ):
        assert torch.equal(exact[h, :5], (all_k[h // G] @ q[h]).topk(5).indices)
    assert int(idx.search(q, 5, 0.1).ids[0, 0]) == n + 3


def test_add_before_build_content_and_empty_build() -> None:
    idx = WaveIndex(SHAPE, {"pending_threshold": "32"})
    idx.build(torch.zeros(HKV, 0, D), torch.zeros(HKV, 0, D), None)
    q = torch.randn(HQ, D)
    res = idx.search(q, 4, 0.1)
    assert res.ids.shape[0] == HQ and res.ids.shape[1] >= 4 and bool((res.ids == -1).all())
    assert res.estimate is not None and bool(torch.isneginf(res.estimate.lse).all())
    keys = torch.randn(HKV, 40, D)
    idx.add(keys, torch.randn(HKV, 40, D))
    assert idx.count == 40
    ids = idx.search(q, 4, 0.1, {"retrieval_fraction": "1"}).ids
    for h in range(HQ):
        assert torch.equal(ids[h, :4], (keys[h // G] @ q[h]).topk(4).indices)


@pytest.mark.parametrize("key_dtype", ["float32", "bfloat16"])
def test_serialization_round_trip(key_dtype: str) -> None:
    idx, _, _, queries = build({"pending_threshold": "100", "key_dtype": key_dtype})
    idx.add(torch.randn(HKV, 7, D), torch.randn(HKV, 7, D))
    data = idx.to_bytes()
    back = WaveIndex.from_bytes(SHAPE, {}, data)
    assert back.to_bytes() == data
    assert back.count == idx.count and back.nbytes() == idx.nbytes() > 0 and back.metric == idx.metric
    for q in queries:
        a, b = idx.search(q, 8, 0.2), back.search(q, 8, 0.2)
        assert torch.equal(a.ids, b.ids) and a.keys_touched == b.keys_touched
        assert a.estimate is not None and b.estimate is not None
        assert torch.equal(a.estimate.output, b.estimate.output) and torch.equal(a.estimate.lse, b.estimate.lse)
    with pytest.raises(ValueError):
        WaveIndex.from_bytes(IndexShape(HKV, HKV, D), {}, data)
    with pytest.raises(ValueError):
        WaveIndex.from_bytes(SHAPE, {}, b"garbage" + data)


def test_container_round_trip() -> None:
    arrays = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int32), "c": torch.zeros(2, 0, 3),
              "d": torch.tensor([True, False]), "e": torch.randn(4, 2).to(torch.bfloat16),
              "f": torch.randn(3).half()}
    meta, back = unpack(pack({"x": [1, "y"]}, arrays))
    assert meta == {"x": [1, "y"]}
    for name, t in arrays.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with pytest.raises(ValueError):
        unpack(pack({}, arrays)[:-4])


def test_params() -> None:
    with pytest.raises(ValueError):
        WaveIndex(SHAPE, {"no_such_knob": "1"})
    with pytest.raises(ValueError):
        WaveIndex(SHAPE, {"ranking": "sideways"})
    p = WaveParams.parse({"cluster_size": "8", "retrieval_fraction": "0.5"})
    assert p.cluster_size == 8 and p.retrieval_fraction == 0.5
    assert WaveParams.parse(p.as_strings()) == p


def test_16bit_keys_rank_as_their_float32_values() -> None:
    """key_dtype=bfloat16 stores the cluster-ordered keys in 16 bits; scores use those values exactly."""
    idx, keys, _, queries = build({"retrieval_fraction": "1", "key_dtype": "bfloat16"})
    rounded = keys.to(torch.bfloat16).float()
    for q in queries:
        ids = idx.search(q, 8, 0.1).ids
        for h in range(HQ):
            s = rounded[h // G] @ q[h]
            torch.testing.assert_close(s[ids[h, :8]], s.topk(8).values)


def test_query_metric_falls_back_without_hints() -> None:
    idx, *_ = build({"metric": "query"}, hints=False)
    assert idx.metric == "euclid"


def test_zone_sizes_cover_k() -> None:
    idx, *_ = build({"retrieval_fraction": "0"})
    r, _ = idx.zone_sizes(200)
    assert r * idx.count / idx.num_clusters >= 200


def test_add_beside_search() -> None:
    """add() publishes one new state: searches running meanwhile see whole states (ids unique and valid)."""
    idx, _, _, queries = build({"pending_threshold": "32", "leftover": "ids", "retrieval_fraction": "1"})
    stop = threading.Event()
    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            while not stop.is_set():
                ids = idx.search(queries[0], 8, 0.1).ids
                for row in ids:
                    got = row[row >= 0]
                    assert got.unique().numel() == got.numel()
        except BaseException as exc:  # reported below
            errors.append(exc)

    worker = threading.Thread(target=searcher)
    worker.start()
    gen = torch.Generator().manual_seed(9)
    for _ in range(12):
        idx.add(torch.randn(HKV, 11, D, generator=gen), torch.randn(HKV, 11, D, generator=gen))
    stop.set()
    worker.join()
    assert not errors and idx.count == 640 + 12 * 11
