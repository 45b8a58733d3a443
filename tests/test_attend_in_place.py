"""A decode Retrieve's result written in place (the reply's shared-memory slots, RetrieveSpec.into): the fused
graph path writes there itself, every other path is copied there; either way the slots hold what a call without
slots returns. The engine runs for real (LMDB data dir, background index builds)."""

from __future__ import annotations

import time

import pytest
import torch

from kvd.engine import Engine
from kvd.errors import InvalidArgument
from kvd.index.base import AttendSlots
from kvd.retrieval import Mode
from kvd.store.session import ModelShape, SessionOptions

SHAPE = ModelShape(1, 2, 4, 32, torch.bfloat16)
K = 16


def _graph_session(engine: Engine, sid: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    engine.create_session("t", sid, SHAPE, SessionOptions(index_kind="graph", sink_tokens=4, window_tokens=16), False)
    keys, values = (torch.randn(1, 2, 1500, 32, generator=g).bfloat16() for _ in range(2))
    hints = torch.randn(1, 4, 64, 32, generator=g)
    engine.append("t", sid, 0, [], keys, values, None, hints, None)
    session = engine.session("t", sid)
    deadline = time.time() + 120
    while not (session.indexes[0] is not None and session.indexes[0].ready):
        assert time.time() < deadline, "the graph was not built"
        time.sleep(0.05)


def _slots(n: int) -> tuple[list[AttendSlots], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    ids, output, lse = torch.full((n, 4, K), -7), torch.full((n, 4, 32), 9.0), torch.full((n, 4), 9.0)
    return [AttendSlots(ids[i], output[i], lse[i]) for i in range(n)], (ids, output, lse)


@pytest.mark.parametrize("params", [{}, {"fuse": "0"}])
def test_results_land_in_the_slots_whatever_path_serves(engine, params):
    for i in range(2):
        _graph_session(engine, f"s{i}", i)
    queries = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(5))
    into, (ids, output, lse) = _slots(2)
    results, _, _ = engine.retrieve("t", ["s0", "s1"], 0, queries, K, Mode.ATTENTION, None, 0.0, False, params,
                                    into=into)
    plain, _, _ = engine.retrieve("t", ["s0", "s1"], 0, queries, K, Mode.ATTENTION, None, 0.0, False, {"fuse": "0"})
    for i, (result, reference) in enumerate(zip(results, plain, strict=True)):
        assert result.index_kind == reference.index_kind == "graph"
        assert result.in_place == (params.get("fuse") != "0") and not reference.in_place
        assert torch.equal(result.ids, reference.ids)
        torch.testing.assert_close(result.output, reference.output, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.lse, reference.lse, rtol=1e-6, atol=1e-6)
        if result.in_place:  # the fused path wrote the slots themselves
            assert result.output.data_ptr() == output[i].data_ptr()
            assert torch.equal(ids[i], reference.ids)
            torch.testing.assert_close(output[i], reference.output, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse[i], reference.lse, rtol=1e-6, atol=1e-6)
        else:  # the service copies these; the engine left the slots alone
            assert bool((ids[i] == -7).all()) and bool((output[i] == 9.0).all())


def test_slots_are_refused_outside_mode_attention_or_per_sequence(engine):
    _graph_session(engine, "s0", 0)
    queries = torch.randn(1, 4, 32)
    with pytest.raises(InvalidArgument, match="slots"):
        engine.retrieve("t", ["s0"], 0, queries, K, Mode.IDS, None, 0.0, False, {}, into=_slots(1)[0])
    with pytest.raises(InvalidArgument, match="slots"):
        engine.retrieve("t", ["s0"], 0, queries, K, Mode.ATTENTION, None, 0.0, False, {}, into=_slots(2)[0])
