"""Pure-torch parts of the transformers integration (no daemon): attention with log-sum-exp, the exact
merge, chunked causal prefill attention, device-side top-N hints, and the cache's window bookkeeping against
an in-process exact stand-in for kvd."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:
    import kvd_transformers
except ImportError:  # the editable install predates the package: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations" / "transformers"))
    import kvd_transformers

from kvd_transformers import KVDCache, ops
from kvd_transformers.local import LocalKvdClient

transformers = pytest.importorskip("transformers")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = q.double() @ kr.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ vr, torch.logsumexp(s, -1)


def test_attend_lse_and_merge_match_full_attention() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    ref_o, ref_lse = _reference(q, k, v, 0.25)
    o, lse = ops.attend_lse(q, k, v, 0.25)
    assert torch.allclose(o.double(), ref_o, atol=1e-5) and torch.allclose(lse.double(), ref_lse, atol=1e-5)
    # two disjoint parts merge exactly; an empty part (lse -inf) changes nothing
    o1, l1 = ops.attend_lse(q, k[:, :, :13], v[:, :, :13], 0.25)
    o2, l2 = ops.attend_lse(q, k[:, :, 13:], v[:, :, 13:], 0.25)
    om, lm = ops.merge_lse(o1, l1, o2, l2)
    assert torch.allclose(om.double(), ref_o, atol=1e-5) and torch.allclose(lm.double(), ref_lse, atol=1e-5)
    empty_o, empty_l = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    om, lm = ops.merge_lse(o, lse, empty_o, empty_l)
    assert torch.equal(om, o) and torch.equal(lm, lse)
    both, both_l = ops.merge_lse(empty_o, empty_l, empty_o, empty_l)
    assert not both.isnan().any() and torch.isinf(both_l).all()


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_causal_attention(padded: bool) -> None:
    torch.manual_seed(1)
    b, hq, hkv, n, prefix, d = 2, 4, 2, 11, 7, 8
    q = torch.randn(b, hq, n, d)
    k, v = torch.randn(b, hkv, prefix + n, d), torch.randn(b, hkv, prefix + n, d)
    qi = torch.arange(n).unsqueeze(1)
    kj = torch.arange(prefix + n).unsqueeze(0)
    mask = (kj <= qi + prefix).view(1, 1, n, prefix + n)
    padding = None
    if padded:
        padding = torch.ones(b, prefix + n, dtype=torch.bool)
        padding[1, :3] = False
        mask = mask & padding[:, None, None, :]
    ref_o, _ = _reference(q, k, v, 0.3, mask)
    out = ops.causal_attention(q, k, v, 0.3, padding=padding, q_chunk=4)
    assert torch.allclose(out.double(), ref_o, atol=1e-5)
    o_lse, _ = ops.attend_lse(q, k, v, 0.3, mask=None if padding is None else padding[:, None, None, :],
                              causal_offset=prefix)
    assert torch.allclose(o_lse.double(), ref_o, atol=1e-5)


def test_exact_topn_hints() -> None:
    torch.manual_seed(2)
    q, k = torch.randn(4, 5, 8), torch.randn(2, 30, 8)
    ids = ops.exact_topn(q, k, 6, begin=4, max_block_bytes=128)
    scores = (q.view(2, 2, 5, 8) @ k[:, 4:].transpose(-1, -2).unsqueeze(1)).view(4, 5, 26)
    assert torch.equal(ids, scores.topk(6, dim=-1).indices + 4)


def _tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_cache_window_bookkeeping_with_local_reference() -> None:
    """Against the in-process exact stand-in: logits equal full attention through prefill + decode, the device
    holds at most sink + window + flush tokens per layer, and kvd receives every token."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 120))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits[0, 79:]
        kvd_transformers.enable(model)
        client = LocalKvdClient()
        cache = KVDCache(client, sink_tokens=4, window_tokens=16, flush_tokens=8, top_k=1000, overlap=False)
        got = [model(ids[:, :80], past_key_values=cache).logits[0, -1]]
        for t in range(80, 120):
            got.append(model(ids[:, t:t + 1], past_key_values=cache).logits[0, -1])
            for layer in cache.layers:
                assert layer.used <= 4 + 16 + 8 and layer.buf_k is not None and layer.buf_k.shape[2] == 28
    assert torch.allclose(torch.stack(got), ref, atol=1e-4)
    cache.flush()
    info = client.get_session(cache.session_ids[0])
    assert info.layer_tokens == [120, 120]
    fetched = client.fetch(cache.session_ids[0], 0, 120)
    layer0 = cache.layers[0]
    assert layer0.buf_k is not None
    w = layer0.win_len
    assert torch.equal(layer0.buf_k[0, :, :4], fetched.keys[0, :, :4])
    assert torch.equal(layer0.buf_k[0, :, 4:4 + w], fetched.keys[0, :, 120 - w:120])


def test_fallback_without_kvd_cache_is_exact() -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, attention_mask=mask).logits
        kvd_transformers.enable(model)
        got = model(ids, attention_mask=mask).logits
    assert torch.allclose(ref[0], got[0], atol=1e-5)
    assert torch.allclose(ref[1, 5:], got[1, 5:], atol=1e-5)


def test_prefill_hints_are_exact_topn_over_final_keys() -> None:
    """A chunked exact prefill sends, per layer, a query sample with its exact top-N over all keys after the
    sink, riding on the held-back last prompt token (sent at the first decode step)."""
    model = _tiny_llama()
    ids = torch.randint(0, 97, (1, 100))
    kvd_transformers.enable(model)
    client = LocalKvdClient()
    # inline appends: what kvd holds is checked between forwards (background appends could still be in flight)
    cache = KVDCache(client, sink_tokens=4, window_tokens=16, flush_tokens=8, top_k=1000, hint_samples=12,
                     hint_topn=5, async_append=False)
    with torch.no_grad():
        for a in range(0, 96, 32):
            model(ids[:, a:a + 32], past_key_values=cache)
        sid = cache.session_ids[0]
        assert client.get_session(sid).layer_tokens == [95, 95]  # last token held back for the hints
        model(ids[:, 96:97], past_key_values=cache)
    cache.flush()
    hints = client.sessions[sid].hints
    assert [h[0] for h in hints] == [[0], [1]]
    for layers, queries, topn in hints:
        assert queries.shape == (1, 4, 12, 16) and topn.shape == (1, 4, 12, 5)
        keys = client.sessions[sid].keys[layers[0]][:, 4:96]  # [Hkv, 92, D]
        scores = queries[0].view(2, 2, 12, 16) @ keys.transpose(-1, -2).unsqueeze(1)
        expected = scores.view(4, 12, 92).topk(5, dim=-1).indices + 4
        assert torch.equal(topn[0], expected)
    cache.close()


def test_chunked_prefill_through_retrieval_is_exact_with_large_k() -> None:
    """exact_prefill=False: each prefill chunk keeps only sink + window on the device and attends to earlier
    chunks through retrieval; with k >= the offloaded part that is still exact (and batch rows independent)."""
    model = _tiny_llama(seed=4)
    ids = torch.randint(0, 97, (2, 110))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        kvd_transformers.enable(model)
        client = LocalKvdClient()
        cache = KVDCache(client, sink_tokens=4, window_tokens=16, flush_tokens=8, top_k=1000, exact_prefill=False,
                         retrieve_chunk=7)
        got = torch.cat([model(ids[:, a:a + 25], past_key_values=cache).logits for a in range(0, 100, 25)]
                        + [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(100, 110)], dim=1)
        for layer in cache.layers:
            assert layer.used <= 4 + 16 + 8
    assert torch.allclose(got, ref, atol=1e-4)
    cache.flush()
    assert client.get_session(cache.session_ids[1]).layer_tokens == [110, 110]


def test_hold_tokens_keeps_newest_decode_tokens_out_of_kvd() -> None:
    """hold_tokens (room for retrospective corrections of recent K/V): the newest tokens are appended only
    once they are older than the hold; results are unchanged."""
    model = _tiny_llama(seed=6)
    ids = torch.randint(0, 97, (1, 90))
    kvd_transformers.enable(model)
    client = LocalKvdClient()
    cache = KVDCache(client, sink_tokens=4, window_tokens=16, flush_tokens=4, hold_tokens=6, top_k=1000)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits[0, -1]
        kvd_transformers.enable(model)
        model(ids[:, :60], past_key_values=cache)
        for t in range(60, 90):
            out = model(ids[:, t:t + 1], past_key_values=cache).logits[0, -1]
            stored = client.get_session(cache.session_ids[0]).num_tokens
            assert stored <= max(60, t + 1 - 6)  # prompt tokens go at once, decode tokens after the hold
    assert torch.allclose(out, ref, atol=1e-4)
    cache.flush()
    assert client.get_session(cache.session_ids[0]).num_tokens == 90


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_gqa_families_match_full_attention(family: str) -> None:
    """Qwen2 (q/k/v biases) and Mistral (no sliding window) through the same cache, against the exact
    stand-in: full attention's logits with k covering the offloaded part."""
    torch.manual_seed(0)
    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None})}
    config_cls, model_cls, extra = cls[family]
    cfg = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=97, **extra)
    model = model_cls(cfg).eval()
    ids = torch.randint(0, 97, (1, 100))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits[0, 69:]
        kvd_transformers.enable(model)
        cache = KVDCache(LocalKvdClient(), sink_tokens=4, window_tokens=16, flush_tokens=8, top_k=1000)
        got = [model(ids[:, :70], past_key_values=cache).logits[0, -1]]
        got += [model(ids[:, t:t + 1], past_key_values=cache).logits[0, -1] for t in range(70, 100)]
    assert torch.allclose(torch.stack(got), ref, atol=1e-4)
    assert cache.stats.retrieve_calls > 0
