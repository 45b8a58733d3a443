"""HnswIndex: hnswlib over the keys (inner product), the baseline index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvd.index.base import IndexShape
from kvd.index.hnsw import HnswIndex, hnsw_structure, replay_touched
from tests.reference import mean_recall, topk_ids


def ood_data(n: int, hkv: int, hq: int, d: int = 64, n_queries: int = 16, seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Small out-of-distribution Q/K: low-rank keys with heavy-tailed norms around a mean; queries around a
    different, far mean (Mahalanobis >> the keys' spread), with their own low-rank part.
    Returns keys [hkv, n, d], prefill queries [hq, 4 * n_queries, d], decode queries [n_queries, hq, d]."""
    gen = torch.Generator().manual_seed(seed)
    rank = 12
    keys = []
    for _ in range(hkv):
        basis = torch.randn(rank, d, generator=gen)
        z = torch.randn(n, rank, generator=gen)
        x = (z @ basis) * torch.exp(0.4 * torch.randn(n, 1, generator=gen)) + 0.1 * torch.randn(n, d, generator=gen)
        keys.append(x + 2.0 * torch.randn(d, generator=gen))
    qs = []
    for _ in range(hq):
        basis = torch.randn(rank, d, generator=gen)
        mean = 8.0 * torch.randn(d, generator=gen)
        qs.append(mean + torch.randn(5 * n_queries, rank, generator=gen) @ basis)
    q = torch.stack(qs)
    return torch.stack(keys), q[:, n_queries:].contiguous(), q[:, :n_queries].transpose(0, 1).contiguous()


SHAPE = IndexShape(num_kv_heads=2, num_query_heads=4, head_dim=64)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ood_data(4000, 2, 4)


@pytest.fixture(scope="module")
def built(data: tuple) -> HnswIndex:
    keys = data[0]
    index = HnswIndex(SHAPE, {"M": "12", "ef_construction": "100", "ef": "100"})
    index.build(keys, None, None)
    return index


def test_recall_and_gqa_mapping(data: tuple, built: HnswIndex) -> None:
    keys, _, dec = data
    recalls = []
    for q in dec[:8]:
        res = built.search(q, 10, 1.0, {"ef": "400", "touched": "off"})
        truth = topk_ids(q, keys, 10)
        recalls.append(mean_recall(res.ids, truth))
        # every returned id is a key of the query head's own KV head: the scores are in decreasing order
        for h in range(4):
            scores = keys[h // 2][res.ids[h]] @ q[h]
            assert torch.all(scores[:-1] >= scores[1:] - 1e-4)
    assert np.mean(recalls) > 0.9


def test_touched_replay_matches_hnswlib(data: tuple, built: HnswIndex) -> None:
    """The replayed search returns what hnswlib returns, so its count is hnswlib's count."""
    pytest.importorskip("numba")
    keys, _, dec = data
    s = hnsw_structure(built._heads[0])
    q = dec[0, 0].numpy()
    built._heads[0].set_ef(50)
    labels, _ = built._heads[0].knn_query(q[None], k=50)
    assert np.allclose(s.vectors, keys[0].numpy())
    touched = replay_touched(s, q, 50)
    assert 50 <= touched < keys.shape[1]
    res = built.search(dec[0], 50, 1.0, {"ef": "50"})
    assert res.keys_touched >= 4 * 50
    assert set(res.ids[0].tolist()) == set(labels[0].tolist())


def test_add_makes_new_keys_findable(data: tuple) -> None:
    keys = data[0]
    index = HnswIndex(SHAPE, {"M": "8", "ef_construction": "50"})
    index.build(keys[:, :1000], None, None)
    index.add(keys[:, 1000:1500], None)
    assert index.count == 1500
    q = torch.stack([keys[h // 2, 1200 + h] * 50.0 for h in range(4)])
    res = index.search(q, 5, 1.0, {"touched": "off"})
    truth = topk_ids(q, keys[:, :1500], 1)
    assert torch.equal(res.ids[:, 0], truth[:, 0])


def test_padding_when_k_exceeds_count(data: tuple) -> None:
    keys, _, dec = data
    index = HnswIndex(SHAPE)
    index.build(keys[:, :7], None, None)
    res = index.search(dec[0], 10, 1.0, {"touched": "off"})
    assert res.ids.shape == (4, 10)
    assert torch.all(res.ids[:, 7:] == -1)
    assert sorted(res.ids[0, :7].tolist()) == list(range(7))


def test_serialization_round_trip(data: tuple, built: HnswIndex) -> None:
    _, _, dec = data
    blob = built.to_bytes()
    again = HnswIndex.from_bytes(SHAPE, {}, blob)
    assert again.count == built.count
    for q in dec[:4]:
        a = built.search(q, 20, 1.0, {"touched": "off"})
        b = again.search(q, 20, 1.0, {"touched": "off"})
        assert torch.equal(a.ids, b.ids)


def test_nbytes_plausible(built: HnswIndex) -> None:
    n, d, m = built.count, SHAPE.head_dim, 12
    per_head_min = n * (4 * d + 4 * 2 * m)
    assert 2 * per_head_min <= built.nbytes() <= 2 * 3 * per_head_min
