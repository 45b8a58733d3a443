"""The real daemon in a subprocess, through the client, over the Unix socket (shared memory and inline
bytes) and loopback TCP: retrieval equals brute force, window + kvd attention equals full attention."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from kvd_client import AsyncKvdClient, KvdClient, merge_attention

from tests.reference import brute_topk, full_attention

TRANSPORTS = ["unix-shm", "unix-inline", "tcp"]


def connect(daemon, transport: str) -> KvdClient:
    if transport == "unix-shm":
        return daemon.client(shm=True)
    if transport == "unix-inline":
        return daemon.client(shm=False)
    return daemon.tcp_client(shm=False)


def make_kv(seed: int, layers: int, kv_heads: int, n: int, d: int, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(layers, kv_heads, n, d, generator=g) * 1.5).to(dtype)
    values = torch.randn(layers, kv_heads, n, d, generator=g).to(dtype)
    return keys, values


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retrieve_ids_equal_brute_force(shared_daemon, transport):
    client = connect(shared_daemon, transport)
    sid = f"exact-{transport}"
    client.create_session(sid, num_layers=2, num_kv_heads=2, num_query_heads=8, head_dim=32, dtype="fp16")
    keys, values = make_kv(1, 2, 2, 700, 32)
    client.append(sid, 0, keys, values)
    q = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    result = client.retrieve(sid, 1, q, k=25, mode="ids")
    assert result.ids.shape == (8, 25)
    assert result.ids.tolist() == brute_topk(q, keys[1], 25)
    assert result.counts == [25]
    assert client.uses_shared_memory == (transport == "unix-shm")
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_window_plus_kvd_partial_attention_equals_full_attention(shared_daemon, transport):
    client = connect(shared_daemon, transport)
    sid = f"merge-{transport}"
    n, d, sink, window = 900, 64, 16, 64
    client.create_session(sid, num_layers=1, num_kv_heads=2, num_query_heads=4, head_dim=d, dtype="fp32",
                          sink_tokens=sink, window_tokens=window)
    keys, values = make_kv(3, 1, 2, n, d, torch.float32)
    client.append(sid, 0, keys, values)
    q = torch.randn(4, d, generator=torch.Generator().manual_seed(4)) * 2
    scale = 1 / math.sqrt(d)
    # k covers the whole offloaded part, so the merge must equal full attention exactly.
    result = client.retrieve(sid, 0, q, k=n)
    assert result.counts == [n - sink - window]
    gpu_positions = list(range(sink)) + list(range(n - window, n))
    o_w, lse_w = full_attention(q, keys[0], values[0], scale, gpu_positions)
    out, lse = merge_attention(torch.from_numpy(o_w).float(), torch.from_numpy(lse_w).float(), result.output,
                               result.lse)
    ref_out, ref_lse = full_attention(q, keys[0], values[0], scale)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), ref_lse, rtol=1e-5, atol=1e-5)
    client.close()


def test_partial_attention_over_top_k_matches_reference(shared_daemon):
    client = shared_daemon.client()
    sid = "topk-attention"
    client.create_session(sid, num_layers=1, num_kv_heads=1, num_query_heads=2, head_dim=16, dtype="bf16")
    keys, values = make_kv(5, 1, 1, 400, 16, torch.bfloat16)
    client.append(sid, 0, keys, values)
    q = torch.randn(2, 16, generator=torch.Generator().manual_seed(6))
    result = client.retrieve(sid, 0, q, k=40, scale=0.2)
    ids = client.retrieve(sid, 0, q, k=40, mode="ids").ids
    for h in range(2):
        ref_out, ref_lse = full_attention(q[h: h + 1], keys[0], values[0], 0.2, ids[h].tolist())
        np.testing.assert_allclose(result.output[h].numpy(), ref_out[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(result.lse[h].item(), ref_lse[0], rtol=1e-5, atol=1e-5)
    # the daemon's own timings: finding and attending are parts of the handler's time
    assert result.search_ms > 0 and result.attend_ms > 0
    assert result.search_ms + result.attend_ms <= result.server_ms
    kv = client.retrieve(sid, 0, q, k=40, mode="ids_kv")
    assert kv.search_ms > 0 and kv.attend_ms == 0.0  # nothing is attended in mode IDS_KV
    assert torch.equal(kv.keys[1], keys[0, 0, ids[1]])
    assert torch.equal(kv.values[0], values[0, 0, ids[0]])
    client.close()


def test_kernel_times_are_parts_of_the_search_and_attention_times(shared_daemon):
    """A decode-sized Retrieve runs its exact scan and its attention as parallel regions: their kernel times
    are reported, each within its step's time."""
    client = shared_daemon.client()
    sid = "kernel-times"
    client.create_session(sid, num_layers=1, num_kv_heads=8, num_query_heads=32, head_dim=64, dtype="bf16")
    keys, values = make_kv(7, 1, 8, 4096, 64, torch.bfloat16)
    client.append(sid, 0, keys, values)
    q = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    for _ in range(3):
        result = client.retrieve(sid, 0, q, k=100, ranges=[(0, 4096)])
        assert 0 < result.search_kernel_ms <= result.search_ms
        assert 0 < result.attend_kernel_ms <= result.attend_ms
    client.delete_session(sid)
    client.close()


def test_region_threads_size_the_kernels_pool_and_results_stay_exact(daemon_factory):
    """server.region_threads sizes the parallel regions (numba reads it once, before its import): the daemon
    says so at startup, and a decode-sized Retrieve over 3 region threads on this host still equals brute
    force."""
    daemon = daemon_factory(["--set", "server.region_threads=3"], tcp=False)
    assert "region_threads=3" in daemon.log()
    client = daemon.client()
    client.create_session("threads", num_layers=1, num_kv_heads=8, num_query_heads=32, head_dim=64, dtype="bf16")
    keys, values = make_kv(9, 1, 8, 4096, 64, torch.bfloat16)
    client.append("threads", 0, keys, values)
    q = torch.randn(32, 64, generator=torch.Generator().manual_seed(10))
    result = client.retrieve("threads", 0, q, k=50, mode="ids", ranges=[(0, 4096)])
    assert result.ids.tolist() == brute_topk(q, keys[0].float(), 50)
    assert result.search_kernel_ms > 0, "the scan ran as a parallel region"
    client.close()


def test_batched_retrieve_over_sessions_of_different_lengths(shared_daemon):
    client = shared_daemon.client()
    sessions, data = [], []
    for i, n in enumerate([50, 300, 1000]):
        sid = f"batch-{i}"
        client.create_session(sid, num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16)
        keys, values = make_kv(10 + i, 2, 2, n, 16)
        client.append(sid, 0, keys, values)
        sessions.append(sid)
        data.append((keys, values))
    q = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(7))
    result = client.retrieve(sessions, 1, q, k=80, mode="ids", ranges=[(0, 0), (10, 200), (0, 0)])
    assert result.ids.shape == (3, 4, 80)
    assert result.counts == [50, 80, 80]
    first = result.ids[0]
    assert first[:, :50].tolist() == brute_topk(q[0], data[0][0][1], 50)
    assert (first[:, 50:] == -1).all()
    assert result.ids[1].tolist() == brute_topk(q[1], data[1][0][1], 80, 10, 200)
    assert result.ids[2].tolist() == brute_topk(q[2], data[2][0][1], 80)
    client.close()


def test_fetch_streaming_append_and_token_ids(shared_daemon):
    client = shared_daemon.client()
    sid = "fetch"
    client.create_session(sid, num_layers=3, num_kv_heads=2, num_query_heads=2, head_dim=8, dtype="bf16")
    keys, values = make_kv(20, 3, 2, 64, 8, torch.bfloat16)
    # Prefill streamed layer by layer, as the transformers integration does.
    for layer in range(3):
        client.append(sid, 0, keys[layer, :, :40], values[layer, :, :40], layers=[layer], token_ids=range(40))
    client.append(sid, 40, keys[:, :, 40:], values[:, :, 40:], token_ids=range(40, 64))
    info = client.get_session(sid)
    assert info.num_tokens == 64 and info.layer_tokens == [64, 64, 64] and info.has_token_ids
    fetched = client.fetch(sid, with_token_ids=True)
    assert torch.equal(fetched.keys, keys) and torch.equal(fetched.values, values)
    assert fetched.token_ids.tolist() == list(range(64))
    part = client.fetch(sid, 10, 20, layers=[2])
    assert torch.equal(part.keys[0], keys[2, :, 10:20])
    client.close()


def test_large_append_is_split_and_arrives_whole(shared_daemon, monkeypatch):
    from kvd_client import client as client_module

    monkeypatch.setattr(client_module, "APPEND_CHUNK_BYTES", 4096)
    client = shared_daemon.client()
    client.create_session("split", num_layers=2, num_kv_heads=2, num_query_heads=2, head_dim=16)
    keys, values = make_kv(21, 2, 2, 333, 16)
    client.append("split", 0, keys, values)
    fetched = client.fetch("split")
    assert torch.equal(fetched.keys, keys) and torch.equal(fetched.values, values)
    client.close()


def test_numpy_inputs_are_accepted(shared_daemon):
    client = shared_daemon.client()
    client.create_session("numpy", num_layers=1, num_kv_heads=1, head_dim=4, dtype="fp32")
    keys = np.arange(40, dtype=np.float32).reshape(1, 1, 10, 4)
    client.append("numpy", 0, keys, keys * 2)
    result = client.retrieve("numpy", 0, np.ones((1, 4), dtype=np.float32), k=3, mode="ids")
    assert result.ids[0].tolist() == [9, 8, 7]
    client.close()


def test_session_lifecycle_and_stats(shared_daemon):
    client = shared_daemon.client()
    info = client.create_session("life-1", num_layers=4, num_kv_heads=2, num_query_heads=4, head_dim=8,
                                 labels={"app": "chat"}, sink_tokens=4, window_tokens=16)
    assert info.num_tokens == 0 and info.state == "open" and info.tier == "memory"
    assert info.labels == {"app": "chat"} and info.sink_tokens == 4
    again = client.create_session("life-1", num_layers=4, num_kv_heads=2, num_query_heads=4, head_dim=8,
                                  exist_ok=True)
    assert again.session_id == "life-1"
    generated = client.create_session(num_layers=1, num_kv_heads=1, head_dim=8)
    assert len(generated.session_id) == 32
    names = [s.session_id for s in client.list_sessions(prefix="life-")]
    assert names == ["life-1"]
    stats = client.stats()
    assert stats.sessions >= 2 and stats.memory_budget_bytes > 0
    client.delete_session("life-1")
    assert "life-1" not in [s.session_id for s in client.list_sessions()]
    client.close()


def test_async_client_overlaps_calls(shared_daemon):
    import asyncio

    async def main():
        async with AsyncKvdClient(shared_daemon.target) as client:
            await client.create_session("async", num_layers=1, num_kv_heads=1, head_dim=8, dtype="fp32")
            keys, values = make_kv(30, 1, 1, 100, 8, torch.float32)
            await client.append("async", 0, keys, values)
            q = torch.randn(1, 8)
            results = await asyncio.gather(*[client.retrieve("async", 0, q, k=5, mode="ids") for _ in range(4)])
            assert client.sync.uses_fast_lane  # the synchronous client underneath takes the fast lane too
            plan = await client.prepare_retrieve("async", k=5)
            plan.plan.queries.copy_(q)
            ran = await plan.run(0)
            ordinary = await client.retrieve("async", 0, q, k=5)
            assert torch.equal(ran.ids, ordinary.ids) and torch.equal(ran.output, ordinary.output)
            await plan.close()
            return q, keys, results

    q, keys, results = asyncio.run(main())
    for result in results:
        assert result.ids.tolist() == brute_topk(q, keys[0], 5)


def test_health_and_reflection(shared_daemon):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    client = shared_daemon.client()
    assert client.health() == "SERVING"
    assert client.health("kvd.v1.Kvd") == "SERVING"
    with grpc.insecure_channel(shared_daemon.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"kvd.v1.Kvd", "grpc.health.v1.Health"} <= services
    client.close()


def test_sigterm_drains_and_releases(daemon_factory):
    daemon = daemon_factory(tcp=False)
    client = daemon.client(shm=True)
    client.create_session("s", num_layers=1, num_kv_heads=1, head_dim=8)
    client.append("s", 0, torch.zeros(1, 1, 4, 8).half(), torch.zeros(1, 1, 4, 8).half())
    region_path = f"/dev/shm/{client._transport.name}"
    assert os.path.exists(region_path)
    code = daemon.stop(signal.SIGTERM)
    assert code == 0
    assert not os.path.exists(daemon.socket)
    log = daemon.log()
    assert "draining" in log and "kvd stopped" in log
    client.close()
    assert not os.path.exists(region_path)
