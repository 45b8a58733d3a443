"""Unit tests of the memory-tier stores: growth, snapshots, token ids, the budget, the readers-writer lock."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvd.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from kvd.store.layer_kv import LayerKV
from kvd.store.registry import Registry
from kvd.store.rwlock import RWLock
from kvd.store.session import ModelShape, SessionOptions, TokenIds

SHAPE = ModelShape(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=8, dtype=torch.float16)


def test_layer_kv_appends_grow_and_keep_every_token():
    layer = LayerKV(2, 8, torch.float16)
    chunks = [torch.randn(2, n, 8).half() for n in (5, 1, 2000, 3)]
    for chunk in chunks:
        layer.append(chunk, -chunk)
    keys, values = layer.view()
    expected = torch.cat(chunks, dim=1)
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert layer.capacity >= layer.length == 2009
    assert layer.bytes_after_append(0) == layer.nbytes


def test_layer_kv_snapshot_survives_reallocation_and_later_appends():
    layer = LayerKV(1, 4, torch.float32)
    layer.append(torch.ones(1, 3, 4), torch.ones(1, 3, 4))
    snapshot, _ = layer.view()
    layer.append(torch.full((1, 5000, 4), 2.0), torch.zeros(1, 5000, 4))
    assert snapshot.shape == (1, 3, 4) and (snapshot == 1).all()
    layer.shrink_to_fit()
    assert layer.capacity == layer.length == 5003
    layer.truncate(3)
    assert layer.view()[0].shape[1] == 3


def test_token_ids_overlap_must_agree():
    ids = TokenIds()
    ids.write(0, torch.arange(10))
    ids.write(5, torch.arange(5, 20))
    assert ids.view().tolist() == list(range(20))
    with pytest.raises(ValueError, match="differ"):
        ids.write(0, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="start at 25"):
        ids.write(25, torch.arange(3))


def test_registry_budget_and_names():
    registry = Registry(memory_budget_bytes=10_000)
    session, created = registry.create("t", "a", SHAPE, SessionOptions())
    assert created
    with pytest.raises(AlreadyExists):
        registry.create("t", "a", SHAPE, SessionOptions())
    assert registry.create("t", "a", SHAPE, SessionOptions(), exist_ok=True) == (session, False)
    other = ModelShape(1, 1, 1, 8, torch.float16)
    with pytest.raises(AlreadyExists, match="another shape"):
        registry.create("t", "a", other, SessionOptions(), exist_ok=True)
    assert registry.create("u", "a", SHAPE, SessionOptions())[1], "tenants have separate namespaces"
    registry.reserve(9_000, session)
    with pytest.raises(ResourceExhausted, match="budget"):
        registry.reserve(20_000, session)
    for bad in ("", "../x", "a/b", "x" * 200, "-x"):
        with pytest.raises(InvalidArgument):
            registry.create("t", bad or "/", SHAPE, SessionOptions())


def test_rwlock_readers_share_writers_exclude():
    lock = RWLock()
    events: list[str] = []
    with lock.read(), lock.read():
        events.append("two readers at once")

    def writer() -> None:
        with lock.write():
            events.append("writer")

    with lock.read():
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.1)
        events.append("reader still inside")
    thread.join(5)
    assert events == ["two readers at once", "reader still inside", "writer"]
