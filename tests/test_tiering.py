"""Tiered storage against the real daemon: restart recovery, SIGKILL fault injection, memory budget with
spill/promote, checksums, disk cap, pins and TTL, prefix lookup, export/import."""

from __future__ import annotations

import random
import signal
import threading
import time

import grpc
import lmdb
import pytest
import torch
from kvd_client import DataLossError, KvdError, ResourceExhaustedError

from kvd.store import records
from tests.reference import brute_topk

LAYERS, KV_HEADS, HEADS, DIM = 2, 2, 4, 16


def kv_chunk(seed: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic K/V of tokens [start, start + n) of the session numbered `seed`."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    data = torch.randn(2, LAYERS, KV_HEADS, n, DIM, generator=g).half()
    return data[0], data[1]


def expected_kv(seed: int, n: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [kv_chunk(seed, a, min(chunk, n - a)) for a in range(0, n, chunk)]
    return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)


def create(client, sid: str, **options) -> None:
    client.create_session(sid, num_layers=LAYERS, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM,
                          dtype="fp16", **options)


def fill(client, sid: str, seed: int, n: int, chunk: int = 64, token_ids=None) -> None:
    for a in range(0, n, chunk):
        keys, values = kv_chunk(seed, a, min(chunk, n - a))
        ids = None if token_ids is None else token_ids[a: a + keys.shape[2]]
        client.append(sid, a, keys, values, token_ids=ids)


def test_persist_survives_restart_byte_identical(daemon_factory):
    daemon = daemon_factory()
    client = daemon.client()
    create(client, "a", sink_tokens=4, window_tokens=8, labels={"k": "v"})
    fill(client, "a", 1, 300, token_ids=list(range(1000, 1300)))
    assert client.persist("a") == 300
    fill_more = kv_chunk(1, 300, 20)
    client.append("a", 300, *fill_more)          # after the durable point: may be lost on a crash
    client.close()
    daemon.kill()
    daemon.start()
    client = daemon.client()
    info = client.get_session("a")
    assert info.num_tokens == 300 and info.durable_tokens == 300 and info.tier == "disk"
    assert info.sink_tokens == 4 and info.labels == {"k": "v"}
    fetched = client.fetch("a", with_token_ids=True)
    keys, values = expected_kv(1, 300, 64)
    assert torch.equal(fetched.keys, keys) and torch.equal(fetched.values, values)
    assert fetched.token_ids.tolist() == list(range(1000, 1300))
    # The reopened session continues: append the next turn, persist, restart cleanly.
    client.append("a", 300, *kv_chunk(1, 300, 20))
    client.persist("a")
    client.close()
    assert daemon.stop() == 0
    daemon.start()
    client = daemon.client()
    keys, values = expected_kv(1, 320, 300)
    fetched = client.fetch("a", 0, 320)
    assert torch.equal(fetched.keys[:, :, :300], expected_kv(1, 300, 64)[0])
    assert torch.equal(fetched.keys[:, :, 300:], kv_chunk(1, 300, 20)[0])
    client.close()


def test_clean_shutdown_flushes_unpersisted_sessions(daemon_factory):
    daemon = daemon_factory()
    client = daemon.client()
    create(client, "flushed")
    fill(client, "flushed", 2, 100)
    client.close()
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    client = daemon.client()
    assert torch.equal(client.fetch("flushed").keys, expected_kv(2, 100, 64)[0])
    client.close()


def test_sigkill_fault_injection_keeps_the_durability_contract(daemon_factory):
    """SIGKILL the daemon at random moments during appends and persists, 20 times, and check after each
    restart: every acknowledged-durable session is listed and byte-identical, and no session is torn."""
    rng = random.Random(7)
    daemon = daemon_factory(tcp=False)
    acked: dict[str, int] = {}
    chunk = 48
    for iteration in range(20):
        client = daemon.client(timeout=10)
        # Check the contract on what survived the previous kill.
        for info in client.list_sessions():
            seed = int(info.session_id.split("-")[1])
            assert info.num_tokens >= acked.get(info.session_id, 0), info
            assert info.num_tokens % chunk == 0 or info.num_tokens == info.layer_tokens[0]
            assert len(set(info.layer_tokens)) == 1, f"torn session {info}"
            fetched = client.fetch(info.session_id)
            keys, values = expected_kv(seed, info.num_tokens, chunk)
            assert torch.equal(fetched.keys, keys) and torch.equal(fetched.values, values), info.session_id
        for sid in acked:
            assert sid in {s.session_id for s in client.list_sessions()}, f"durable session {sid} lost"
        stop = threading.Event()

        def work(client=client, iteration=iteration, stop=stop) -> None:
            try:
                for s in range(3):
                    sid = f"s-{iteration * 10 + s}"
                    create(client, sid)
                    n = 0
                    while not stop.is_set() and n < 20 * chunk:
                        client.append(sid, n, *kv_chunk(iteration * 10 + s, n, chunk))
                        n += chunk
                        if rng.random() < 0.4:
                            durable = client.persist(sid)
                            acked[sid] = durable
            except KvdError:
                pass

        worker = threading.Thread(target=work)
        worker.start()
        time.sleep(rng.uniform(0.05, 0.6))
        daemon.kill()
        stop.set()
        worker.join(30)
        client.close()
        daemon.start()
    assert acked, "the workload never reached a persist"


def test_memory_budget_spills_and_promotes(daemon_factory):
    daemon = daemon_factory(["--memory-budget", "600KiB"], tcp=False)
    client = daemon.client()
    n = 1024   # 2 layers x 2 heads x 1024 tokens x 16 x 2 bytes x (K, V) = 256 KiB per session
    for i in range(6):
        create(client, f"m{i}")
        fill(client, f"m{i}", 10 + i, n, chunk=512)
    stats = client.stats()
    assert stats.memory_bytes <= stats.memory_budget_bytes
    assert stats.sessions_on_disk >= 3 and stats.counters["spills"] >= 3
    q = torch.randn(HEADS, DIM, generator=torch.Generator().manual_seed(3))
    for i in range(6):
        result = client.retrieve(f"m{i}", 1, q, k=10, mode="ids")
        keys, _ = expected_kv(10 + i, n, 512)
        assert result.ids.tolist() == brute_topk(q, keys[1], 10)
    stats = client.stats()
    assert stats.counters["promotions"] >= 3
    assert stats.memory_bytes <= stats.memory_budget_bytes
    info = client.get_session("m0")
    assert info.promotions >= 1
    client.close()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_spill_really_frees_resident_memory(daemon_factory):
    daemon = daemon_factory(["--memory-budget", "200MiB"], tcp=False)
    client = daemon.client()
    big = 64 * 2**20  # bytes of K (and as much of V) per session: 128 MiB of KV
    tokens = big // (LAYERS * KV_HEADS * DIM * 2)
    for sid in ("big-a", "big-b"):
        create(client, sid)
        keys = torch.full((LAYERS, KV_HEADS, tokens, DIM), 0.5, dtype=torch.float16)
        client.append(sid, 0, keys, keys)
        if sid == "big-a":
            with_a = _rss_bytes(daemon.proc.pid)
    with_b = _rss_bytes(daemon.proc.pid)
    assert client.get_session("big-a").tier == "disk"
    # B's 128 MiB arrived and A's 128 MiB left: resident memory must not have grown by anything like 128 MiB.
    assert with_b - with_a < 48 * 2**20, (with_a, with_b)
    client.close()


def test_corrupted_record_marks_session_damaged(daemon_factory):
    daemon = daemon_factory(tcp=False)
    client = daemon.client()
    for sid, seed in (("victim", 20), ("bystander", 21)):
        create(client, sid)
        fill(client, sid, seed, 128)
        client.persist(sid)
    client.close()
    daemon.stop()
    env = lmdb.open(str(daemon.workdir / "data" / "kvd.lmdb"), max_dbs=4, subdir=True)
    chunks = env.open_db(b"chunks")
    key = records.chunk_key("default", "victim", records.KIND_KV, 1, 0)
    with env.begin(write=True, db=chunks) as txn:
        value = bytearray(txn.get(key))
        value[100] ^= 0xFF
        txn.put(key, bytes(value))
    env.close()
    daemon.start()
    client = daemon.client()
    with pytest.raises(DataLossError, match="checksum"):
        client.retrieve("victim", 0, torch.ones(HEADS, DIM), k=5)
    assert client.get_session("victim").state == "damaged"
    keys, _ = expected_kv(21, 128, 64)
    q = torch.ones(HEADS, DIM)
    assert client.retrieve("bystander", 1, q, k=5, mode="ids").ids.tolist() == brute_topk(q, keys[1], 5)
    assert client.stats().counters["damaged"] == 1
    client.close()
    daemon.restart()
    client = daemon.client()
    assert client.get_session("victim").state == "damaged", "damage is remembered across restarts"
    client.close()


def test_disk_cap_evicts_oldest_unpinned_never_pinned(daemon_factory):
    per_session = LAYERS * KV_HEADS * 256 * DIM * 2 * 2   # 64 KiB
    daemon = daemon_factory(["--disk-budget", str(int(per_session * 3.5))], tcp=False)
    client = daemon.client()
    create(client, "pinned", pinned=True)
    fill(client, "pinned", 30, 256)
    client.persist("pinned")
    for i in range(4):
        create(client, f"d{i}")
        fill(client, f"d{i}", 31 + i, 256)
        client.persist(f"d{i}")
        time.sleep(0.01)
    stats = client.stats()
    assert stats.disk_bytes <= stats.disk_budget_bytes
    assert stats.counters["evictions"] >= 1
    assert client.get_session("pinned").durable_tokens == 256
    assert client.get_session("d3").durable_tokens == 256
    assert client.get_session("d0").durable_tokens == 0, "the oldest unpinned session lost its disk copy"
    client.close()
    daemon2 = daemon_factory(["--disk-budget", str(per_session)], tcp=False, subdir="d2")
    client = daemon2.client()
    create(client, "p1", pinned=True)
    fill(client, "p1", 40, 256)
    client.persist("p1")
    create(client, "p2", pinned=True)
    fill(client, "p2", 41, 256)
    with pytest.raises(ResourceExhaustedError, match="disk budget"):
        client.persist("p2")
    client.close()


def test_ttl_expiry_and_delete_free_both_tiers(daemon_factory):
    daemon = daemon_factory(tcp=False)
    client = daemon.client()
    create(client, "short", ttl_seconds=1)
    fill(client, "short", 50, 64)
    client.persist("short")
    create(client, "kept", ttl_seconds=1, pinned=True)
    fill(client, "kept", 51, 64)
    deadline = time.time() + 10
    while "short" in {s.session_id for s in client.list_sessions()} and time.time() < deadline:
        time.sleep(0.2)
    names = {s.session_id for s in client.list_sessions()}
    assert "short" not in names and "kept" in names
    create(client, "gone")
    fill(client, "gone", 52, 2048, chunk=1024)
    client.persist("gone")
    before = client.stats()
    reply = client.delete_session("gone")
    after = client.stats()
    assert reply.freed_disk_bytes > 0 and reply.freed_memory_bytes > 0
    assert before.disk_bytes - after.disk_bytes == reply.freed_disk_bytes
    assert before.memory_bytes - after.memory_bytes == reply.freed_memory_bytes
    client.close()
    daemon.restart()
    client = daemon.client()
    assert "gone" not in {s.session_id for s in client.list_sessions()}
    assert "short" not in {s.session_id for s in client.list_sessions()}
    client.close()


def test_lmdb_pages_are_freed_on_delete(tmp_path):
    from kvd.config import load
    from kvd.engine import Engine
    from kvd.store.session import ModelShape, SessionOptions

    config = load(overrides={"storage.data_dir": str(tmp_path)}, environ={})
    engine = Engine(config)
    engine.start()
    shape = ModelShape(LAYERS, KV_HEADS, HEADS, DIM, torch.float16)
    engine.create_session("t", "x", shape, SessionOptions(), False)
    keys, values = expected_kv(60, 4096, 4096)
    engine.append("t", "x", 0, [], keys, values, None, None, None)
    engine.persist("t", "x", False)
    store = engine.tiering.store
    used = store.used_bytes()
    engine.delete_session("t", "x")
    assert store.used_bytes() < used - keys.numel() * 2 * 2 * 0.9
    engine.close()


def test_prefix_lookup_across_restart(daemon_factory):
    daemon = daemon_factory(tcp=False)
    client = daemon.client()
    history = list(range(5000, 5000 + 700))
    create(client, "chat")
    fill(client, "chat", 70, 700, chunk=100, token_ids=history)
    client.persist("chat")
    create(client, "other")
    fill(client, "other", 71, 300, chunk=100, token_ids=list(range(300)))
    client.persist("other")
    client.close()
    daemon.kill()
    daemon.start()
    client = daemon.client()
    next_turn = [*history, 1, 2, 3]
    assert client.lookup_prefix(next_turn) == ("chat", 700)
    diverged = history[:600] + [9] * 50
    assert client.lookup_prefix(diverged) == ("chat", 600)
    assert client.lookup_prefix([*list(range(100)), 7]) == ("other", 100)
    assert client.lookup_prefix([123456]) == (None, 0)
    client.close()


def test_export_import_roundtrip_and_integrity(daemon_factory):
    source = daemon_factory(tcp=False, subdir="src")
    target = daemon_factory(tcp=False, subdir="dst")
    a, b = source.client(), target.client()
    create(a, "moving")
    fill(a, "moving", 80, 200, token_ids=list(range(200)))
    blob = b"".join(a.export_session("moving"))
    info = b.import_session(blob)
    assert info.num_tokens == 200 and info.durable_tokens == 200
    assert torch.equal(b.fetch("moving").keys, expected_kv(80, 200, 64)[0])
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 1
    b.delete_session("moving")
    with pytest.raises(KvdError) as caught:
        b.import_session(bytes(damaged))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "integrity" in caught.value.details
    a.close()
    b.close()


def test_truncate_then_persist_rewrites_the_tail(daemon_factory):
    daemon = daemon_factory(tcp=False)
    client = daemon.client()
    create(client, "tr")
    fill(client, "tr", 90, 256)
    client.persist("tr")
    client.truncate("tr", 100)
    replacement = kv_chunk(91, 100, 50)
    client.append("tr", 100, *replacement)
    client.persist("tr")
    client.close()
    daemon.kill()
    daemon.start()
    client = daemon.client()
    fetched = client.fetch("tr")
    assert fetched.keys.shape[2] == 150
    assert torch.equal(fetched.keys[:, :, :100], expected_kv(90, 256, 64)[0][:, :, :100])
    assert torch.equal(fetched.keys[:, :, 100:], replacement[0])
    client.close()
