"""A layer whose index build (or a later add of decode keys) fails at run time: the exact scan keeps serving it,
correctly, and the failure is visible to operators (IndexStatus.error, kvd_index_failures_total), not only in
the daemon log. The engine runs for real (LMDB data dir, index pool); only the index's own method is made to
fail, as a bug or an out-of-memory would."""

from __future__ import annotations

import time

import torch

from kvd import convert, metrics
from kvd.index.graph import GraphIndex
from kvd.index.manager import ADD_BATCH_TOKENS
from kvd.retrieval import Mode
from kvd.store.session import ModelShape, SessionOptions
from tests.reference import brute_topk

SHAPE = ModelShape(1, 2, 4, 32, torch.float32)


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g)


def _failures(stage: str) -> float:
    return metrics.INDEX_FAILURES.labels("graph", stage).get()


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_a_failed_build_is_reported_and_the_exact_scan_serves(engine, monkeypatch):
    def broken_build(self, *args, **kwargs):
        raise MemoryError("no room for the graph rows")

    monkeypatch.setattr(GraphIndex, "build", broken_build)
    before = _failures("build")
    engine.create_session("t", "s", SHAPE, SessionOptions(index_kind="graph"), False)
    keys, values = _kv(600, 1)
    engine.append("t", "s", 0, [], keys, values, None, None, None)
    queries = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(2))
    engine.retrieve("t", ["s"], 0, queries, 10, Mode.IDS, None, 0.0, False, {})  # starts the build
    session = engine.session("t", "s")
    _wait(lambda: session.indexes[0].failed, "the build did not fail")
    status = convert.session_info(session).indexes[0]
    assert not status.ready
    assert status.error == "build failed: no room for the graph rows"
    assert _failures("build") == before + 1
    results, _, _ = engine.retrieve("t", ["s"], 0, queries, 10, Mode.IDS, None, 0.0, False, {})
    assert results[0].index_kind == "flat"
    assert [sorted(row) for row in results[0].ids.tolist()] == \
        [sorted(row) for row in brute_topk(queries[0], keys[0], 10)]


def test_a_failed_add_is_reported_and_new_keys_stay_findable(engine, monkeypatch):
    engine.create_session("t", "s", SHAPE, SessionOptions(index_kind="graph"), False)
    keys, values = _kv(600, 3)
    engine.append("t", "s", 0, [], keys, values, None, None, None)
    queries = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(4))
    engine.retrieve("t", ["s"], 0, queries, 10, Mode.IDS, None, 0.0, False, {})
    session = engine.session("t", "s")
    _wait(lambda: session.indexes[0].ready, "the index was not built")

    def broken_add(self, *args, **kwargs):
        raise RuntimeError("rows could not grow")

    monkeypatch.setattr(GraphIndex, "add", broken_add)
    before = _failures("add")
    more_keys, more_values = _kv(ADD_BATCH_TOKENS + 8, 5)
    # the last new key of each KV head is query head 0's / 2's, scaled up: the best match although not indexed
    more_keys[0, :, -1] = queries[0, ::2] * 50
    engine.append("t", "s", 600, [], more_keys, more_values, None, None, None)
    engine.retrieve("t", ["s"], 0, queries, 10, Mode.IDS, None, 0.0, False, {})  # starts the add
    slot = session.indexes[0]
    _wait(lambda: slot.add_failed, "the add did not fail")
    assert convert.session_info(session).indexes[0].error == "adding keys failed: rows could not grow"
    assert _failures("add") == before + 1
    for _ in range(3):  # later Retrieves do not retry the add before another batch of keys has arrived
        results, _, _ = engine.retrieve("t", ["s"], 0, queries, 10, Mode.IDS, None, 0.0, False, {})
    time.sleep(0.2)
    assert _failures("add") == before + 1
    assert results[0].index_kind == "graph"
    last = 600 + ADD_BATCH_TOKENS + 8 - 1
    ids = results[0].ids.tolist()
    assert ids[0][0] == last and ids[2][0] == last  # query heads 0 and 2 (one per KV head) aimed at it
