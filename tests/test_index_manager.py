"""Index lifecycle in the daemon: exact service until ready, background builds from hints, tails of decode
keys, spill/promote of index state, and agreement with brute force when the index is exhaustive."""

from __future__ import annotations

import time

import pytest
import torch

from tests.reference import brute_topk

KINDS = ["hnsw", "wave", "graph"]


def clustered_kv(seed: int, n: int, kv_heads: int = 2, d: int = 32):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(16, d, generator=g) * 3
    labels = torch.randint(0, 16, (kv_heads, n), generator=g)
    keys = centers[labels] + 0.3 * torch.randn(kv_heads, n, d, generator=g)
    values = torch.randn(kv_heads, n, d, generator=g)
    return keys, values


def bf16_session(client, sid: str, seed: int, n: int, extra: int = 0, kind: str = "graph", sink: int = 4,
                 window: int = 64, hq: int = 4, d: int = 32):
    """A one-layer bf16 session (2 KV heads) of `kind` holding the first n of n + extra clustered keys, built
    (graph) from 64 random hint queries per head; returns all n + extra keys and values."""
    client.create_session(sid, num_layers=1, num_kv_heads=2, num_query_heads=hq, head_dim=d, dtype="bf16",
                          index=kind, sink_tokens=sink, window_tokens=window)
    keys, values = clustered_kv(seed, n + extra)
    keys, values = keys.bfloat16(), values.bfloat16()
    client.append(sid, 0, keys[:, :n].unsqueeze(0), values[:, :n].unsqueeze(0),
                  hint_queries=torch.randn(1, hq, 64, d, generator=torch.Generator().manual_seed(seed + 1)))
    if kind == "graph":
        wait_ready(client, sid, 1)
    return keys, values


def wait_ready(client, sid: str, layers: int, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = client.get_session(sid)
        ready = [i for i in info.indexes if i["ready"]]
        if len(ready) == layers:
            return info
        time.sleep(0.1)
    raise TimeoutError(f"indexes of {sid} not ready: {client.get_session(sid).indexes}")


@pytest.mark.parametrize("kind", KINDS)
def test_index_lifecycle(shared_daemon, kind):
    pytest.importorskip(f"kvd.index.{kind}", reason=f"the {kind} index module is not in this tree")
    client = shared_daemon.client()
    sid = f"lifecycle-{kind}"
    n, sink, window, d = 3000, 4, 64, 32
    client.create_session(sid, num_layers=1, num_kv_heads=2, num_query_heads=4, head_dim=d, dtype="fp32",
                          index=kind, sink_tokens=sink, window_tokens=window)
    keys, values = clustered_kv(1, n + 700)
    q = torch.randn(4, d, generator=torch.Generator().manual_seed(2)) * 2
    hint_queries = torch.randn(1, 4, 64, d, generator=torch.Generator().manual_seed(3))
    client.append(sid, 0, keys[:, :n].unsqueeze(0), values[:, :n].unsqueeze(0), hint_queries=hint_queries)
    # Served (exactly, or from the index once ready) with correct, in-range results at every moment.
    first = client.retrieve(sid, 0, q, k=10, mode="ids")
    assert ((first.ids >= sink) & (first.ids < n - window)).all()
    info = wait_ready(client, sid, 1)
    assert info.indexes[0]["kind"] == kind and info.indexes[0]["indexed_tokens"] == n - sink - window
    # An exhaustive search (k = all offloaded keys) equals brute force whatever the index.
    everything = client.retrieve(sid, 0, q, k=n, mode="ids", search_params={"ef": 4096})
    exact = client.retrieve(sid, 0, q, k=n, mode="ids", exact=True)
    assert sorted(everything.ids[0].tolist()) == sorted(exact.ids[0].tolist())
    # Decode tokens leave the window: they are searched (exact tail, then added) and found.
    target = n + 600 - window - 10           # an offloaded decode-time key, made to stand out
    direction = torch.nn.functional.normalize(torch.randn(2, d, generator=torch.Generator().manual_seed(9)), dim=1)
    keys[:, target] = 60 * direction
    for start in range(n, n + 700, 100):
        client.append(sid, start, keys[:, start:start + 100].unsqueeze(0), values[:, start:start + 100].unsqueeze(0))
    probe = torch.cat([direction[:1].repeat(2, 1), direction[1:].repeat(2, 1)])
    found = client.retrieve(sid, 0, probe, k=5, mode="ids")
    assert target in found.ids[0].tolist() and target in found.ids[3].tolist()
    hits = client.retrieve(sid, 0, q, k=20, mode="ids")
    reference = brute_topk(q, keys[:, : n + 700], 20, sink, n + 700 - window)
    recall = sum(len(set(a) & set(b)) for a, b in zip(hits.ids.tolist(), reference, strict=True)) / 80
    assert recall >= 0.6, recall
    # A narrower range than the index covers is served exactly, and counted as a bypass of the index.
    bypassed = client.stats().counters.get("retrieves_index_bypassed", 0)
    narrow = client.retrieve(sid, 0, q, k=7, mode="ids", ranges=[(100, 900)])
    assert narrow.ids.tolist() == brute_topk(q, keys, 7, 100, 900)
    assert narrow.index_kinds == ["flat"]
    assert client.stats().counters.get("retrieves_index_bypassed", 0) == bypassed + 1
    client.retrieve(sid, 0, q, k=7, mode="ids", ranges=[(100, 900)], exact=True)   # asked for: not a bypass
    assert client.stats().counters.get("retrieves_index_bypassed", 0) == bypassed + 1
    client.close()


def test_graph_decode_attention_with_a_tail_is_fused_and_equals_the_stepwise_path(shared_daemon):
    """A decode Retrieve in mode attention while decode keys are not in the graph yet (the tail): served by one
    compiled pass (search, tail scan, attention; no separate attention time) with the ids of the step-by-step
    path (fuse=0), the tail's standout key among them, and the float64 attention over exactly those ids."""
    from tests.reference import full_attention

    client = shared_daemon.client()
    sid = "graph-fused-tail"
    n, sink, window, d, hq = 2500, 4, 64, 32, 4
    keys, values = bf16_session(client, sid, 11, n, 300)
    target = n + 100  # offloaded after the build, fewer than a batch of keys: scanned as the tail
    probe = torch.randn(2, d, generator=torch.Generator().manual_seed(13)).repeat_interleave(2, 0)  # per KV head
    keys[:, target] = (probe[::2] * 8).bfloat16()
    client.append(sid, n, keys[:, n:].unsqueeze(0), values[:, n:].unsqueeze(0))
    assert client.get_session(sid).indexes[0]["indexed_tokens"] == n - sink - window
    end = n + 300 - window
    scale = d ** -0.5
    fused = client.retrieve(sid, 0, probe, k=40, mode="attention", scale=scale)
    stepwise = client.retrieve(sid, 0, probe, k=40, mode="attention", scale=scale, search_params={"fuse": 0})
    assert fused.index_kinds == stepwise.index_kinds == ["graph"]
    assert fused.attend_ms == 0.0 and stepwise.attend_ms > 0.0
    assert fused.ids.tolist() == stepwise.ids.tolist()
    for h in range(hq):
        ids = fused.ids[h].tolist()
        assert ids[0] == target, (h, ids[:5])
        assert all(sink <= i < end for i in ids)
        out, lse = full_attention(probe[h:h + 1], keys[h // 2:h // 2 + 1].float(), values[h // 2:h // 2 + 1].float(),
                                  scale, ids)
        torch.testing.assert_close(fused.output[h].double(), torch.from_numpy(out[0]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.lse[h].double(), torch.tensor(lse[0]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused.output[h], stepwise.output[h], rtol=1e-5, atol=1e-6)
    client.delete_session(sid)
    client.close()


def test_graph_retro_past_queries_fused_or_not_equal_the_stepwise_path(shared_daemon):
    """RetroAttention's past queries through the daemon on a graph session: the fused region (fuse=1) returns
    what the step-by-step path (fuse=0) and fuse=current (past queries in their own pass) do, packed or not,
    and a past query's output equals the float64 attention over the retrieved keys it had not seen."""
    from tests.reference import full_attention

    client = shared_daemon.client()
    sid = "graph-fused-retro"
    n, sink, window, d, hq = 2500, 4, 64, 32, 4
    client.create_session(sid, num_layers=1, num_kv_heads=2, num_query_heads=hq, head_dim=d, dtype="bf16",
                          index="graph", sink_tokens=sink, window_tokens=window)
    keys, values = clustered_kv(21, n)
    keys, values = keys.bfloat16(), values.bfloat16()
    client.append(sid, 0, keys.unsqueeze(0), values.unsqueeze(0),
                  hint_queries=torch.randn(1, hq, 64, d, generator=torch.Generator().manual_seed(22)))
    wait_ready(client, sid, 1)
    gen = torch.Generator().manual_seed(23)
    q, past_q = torch.randn(hq, d, generator=gen) * 2, torch.randn(1, hq, d, generator=gen) * 2
    first = client.retrieve(sid, 0, q, k=30, mode="ids")
    seen = first.ids[:, :10].unsqueeze(0)  # the past query saw the 10 best of each head already
    scale = d ** -0.5
    args = {"k": 30, "mode": "attention", "scale": scale, "past_queries": past_q, "past_seen_ids": seen,
            "past_seen_from": torch.tensor([n])}
    fused = client.retrieve(sid, 0, q, **args)
    stepwise = client.retrieve(sid, 0, q, search_params={"fuse": 0}, **args)
    default = client.retrieve(sid, 0, q, search_params={"fuse": "current"}, **args)  # past queries after the search
    packed = client.retrieve(sid, 0, q, packed=True, **args)
    assert fused.attend_ms == 0.0 and stepwise.attend_ms > 0.0 and default.attend_ms > 0.0
    assert default.ids.tolist() == fused.ids.tolist()
    torch.testing.assert_close(default.past_output, fused.past_output, rtol=1e-6, atol=1e-6)
    assert fused.ids.tolist() == stepwise.ids.tolist() == first.ids.tolist()
    for name in ("output", "lse", "past_output", "past_lse"):
        torch.testing.assert_close(getattr(fused, name), getattr(stepwise, name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.packed[1, ..., :d], fused.output, rtol=0, atol=0)
    torch.testing.assert_close(packed.packed[0, ..., d], fused.past_lse[0], rtol=0, atol=0)
    for h in range(hq):
        new = fused.ids[h, 10:].tolist()
        out, lse = full_attention(past_q[0, h:h + 1], keys[h // 2:h // 2 + 1].float(),
                                  values[h // 2:h // 2 + 1].float(), scale, new)
        torch.testing.assert_close(fused.past_output[0, h].double(), torch.from_numpy(out[0]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.past_lse[0, h].double(), torch.tensor(lse[0]), rtol=1e-6, atol=1e-6)
    client.delete_session(sid)
    client.close()


@pytest.mark.parametrize("kind", ["hnsw", "graph"])
def test_index_survives_spill_and_promote(daemon_factory, kind):
    """Also the graph, whose blob holds no keys: after the promotion it reads the reloaded store."""
    pytest.importorskip(f"kvd.index.{kind}")
    daemon = daemon_factory(["--memory-budget", "2MiB"], tcp=False)
    client = daemon.client()
    keys, values = clustered_kv(5, 2000)
    client.create_session("ix", num_layers=1, num_kv_heads=2, num_query_heads=4, head_dim=32, dtype="fp32",
                          index=kind)
    client.append("ix", 0, keys.unsqueeze(0), values.unsqueeze(0), hint_queries=torch.randn(1, 4, 8, 32))
    wait_ready(client, "ix", 1)
    q = torch.randn(4, 32)
    before = client.retrieve("ix", 0, q, k=10, mode="ids")
    client.create_session("pusher", num_layers=1, num_kv_heads=2, num_query_heads=4, head_dim=32, dtype="fp32")
    client.append("pusher", 0, keys.unsqueeze(0), values.unsqueeze(0))
    assert client.get_session("ix").tier == "disk"
    after = client.retrieve("ix", 0, q, k=10, mode="ids")
    assert after.promoted == [True]
    assert after.index_kinds == [kind], "the index came back from disk without a rebuild"
    assert after.ids.tolist() == before.ids.tolist()
    client.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_graph_attention_is_exact_over_its_ids_for_every_session_dtype(shared_daemon, dtype):
    """The graph reads bf16 and float32 sessions' own keys (its scores are exact and reused) and keeps a bf16
    copy of an fp16 session's (the chosen keys are rescored from the session): either way the partial
    attention equals a float64 reference over the returned ids."""
    client = shared_daemon.client()
    sid = f"graph-scores-{str(dtype).removeprefix('torch.')}"
    n, sink, window, d, hq = 2500, 4, 64, 32, 4
    client.create_session(sid, num_layers=1, num_kv_heads=2, num_query_heads=hq, head_dim=d, dtype=dtype,
                          index="graph", sink_tokens=sink, window_tokens=window)
    keys, values = clustered_kv(5, n)
    keys, values = keys.to(dtype), values.to(dtype)
    hint_queries = torch.randn(1, hq, 64, d, generator=torch.Generator().manual_seed(6))
    client.append(sid, 0, keys.unsqueeze(0), values.unsqueeze(0), hint_queries=hint_queries)
    info = wait_ready(client, sid, 1).indexes[0]
    # bf16 and float32 sessions' graphs read the session's keys; fp16 ones keep a bf16 copy of them
    indexed = info["indexed_tokens"]
    rows_bytes, copy_bytes = 2 * indexed * 64 * 4, 2 * indexed * d * 2
    assert rows_bytes < info["bytes"] < rows_bytes + (copy_bytes if dtype != torch.float16 else 2 * copy_bytes)
    if dtype == torch.float16:
        assert info["bytes"] > rows_bytes + copy_bytes
    q = torch.randn(hq, d, generator=torch.Generator().manual_seed(7)) * 2
    scale = d ** -0.5
    res = client.retrieve(sid, 0, q, k=50, mode="attention", scale=scale)
    assert res.index_kinds == ["graph"]
    for h in range(hq):
        ids = res.ids[h][res.ids[h] >= 0]
        assert len(ids) == 50
        kh, vh = keys[h // 2, ids].double(), values[h // 2, ids].double()
        logits = (kh @ q[h].double()) * scale
        weights = torch.softmax(logits, 0)
        torch.testing.assert_close(res.output[h].double(), weights @ vh, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.lse[h].double(), torch.logsumexp(logits, 0), rtol=1e-6, atol=1e-6)
    client.delete_session(sid)
    client.close()


def test_hints_after_a_hintless_build_rebuild_the_index_from_them(shared_daemon):
    """A client that retrieves before sending its hints gets an index built without them (keys as stand-in
    queries); hints that arrive later build it again from them, and the layer is served correctly throughout."""
    client = shared_daemon.client()
    sid, n, d = "late-hints", 3000, 32
    client.create_session(sid, num_layers=1, num_kv_heads=2, num_query_heads=4, head_dim=d, dtype="fp32",
                          index="graph", sink_tokens=4, window_tokens=64)
    keys, values = clustered_kv(11, n + 200)
    client.append(sid, 0, keys[:, :n].unsqueeze(0), values[:, :n].unsqueeze(0))
    q = torch.randn(4, d, generator=torch.Generator().manual_seed(12)) * 2
    client.retrieve(sid, 0, q, k=10, mode="ids")          # starts a build without hints
    assert wait_ready(client, sid, 1).indexes[0]["from_hints"] is False
    hint_queries = torch.randn(1, 4, 64, d, generator=torch.Generator().manual_seed(13))
    client.append(sid, n, keys[:, n:].unsqueeze(0), values[:, n:].unsqueeze(0), hint_queries=hint_queries)
    deadline = time.time() + 60
    while not client.get_session(sid).indexes[0]["from_hints"]:
        assert time.time() < deadline
        client.retrieve(sid, 0, q, k=10, mode="ids")      # served (by the old index) while it is rebuilt
        time.sleep(0.05)
    everything = client.retrieve(sid, 0, q, k=n, mode="ids", search_params={"ef": 8192})
    exact = client.retrieve(sid, 0, q, k=n, mode="ids", exact=True)
    assert everything.index_kinds == ["graph"]
    assert sorted(everything.ids[0].tolist()) == sorted(exact.ids[0].tolist())
    client.delete_session(sid)
    client.close()
