"""Retrieve with past queries (RetroAttention, kvd.retro) against a real daemon: each past query's partial
attention over its newly seen keys equals a brute-force float64 reference; bad input is INVALID_ARGUMENT."""

from __future__ import annotations

import math
import uuid

import grpc
import numpy as np
import pytest
import torch
from kvd_client import InvalidArgumentError
from kvd_client.wire import encode_inline

from kvd.v1 import kvd_pb2 as pb
from kvd.v1 import kvd_pb2_grpc as pb_grpc

HKV, HQ, D, T, SINK, WINDOW = 2, 4, 16, 300, 4, 16


@pytest.fixture(scope="module")
def sessions(shared_daemon):
    """Two sessions with random K/V (a batch of 2; fp16 takes the daemon's torch path, bf16 its compiled row
    kernels) and their K/V as float64 arrays."""
    client = shared_daemon.client(shm=False)
    torch.manual_seed(0)
    data = {}
    for dtype in (torch.float16, torch.bfloat16):
        sid = f"retro-{uuid.uuid4().hex[:8]}"
        client.create_session(sid, num_layers=2, num_kv_heads=HKV, num_query_heads=HQ, head_dim=D, dtype=dtype,
                              index="flat", sink_tokens=SINK, window_tokens=WINDOW)
        keys = (torch.randn(2, HKV, T, D) * 1.5).to(dtype)
        values = torch.randn(2, HKV, T, D).to(dtype)
        client.append(sid, 0, keys, values)
        data[sid] = (keys.double().numpy(), values.double().numpy())
    client.close()
    return data


def reference_past(keys: np.ndarray, values: np.ndarray, ids: torch.Tensor, past_q: torch.Tensor,
                   seen_ids: torch.Tensor | None, seen_from: torch.Tensor | None, scale: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One sequence, one layer: keys/values [Hkv, T, D]; ids [Hq, k]; past_q [P, Hq, D]. Plain loops, float64."""
    count = past_q.shape[0]
    group = HQ // HKV
    out = np.zeros((count, HQ, D))
    lse = np.full((count, HQ), -np.inf)
    for p in range(count):
        for h in range(HQ):
            seen = set() if seen_ids is None else {int(x) for x in seen_ids[p, h]}
            bound = math.inf if seen_from is None else int(seen_from[p])
            new = [int(i) for i in ids[h] if 0 <= int(i) < bound and int(i) not in seen]
            if not new:
                continue
            scores = keys[h // group, new] @ past_q[p, h].double().numpy() * scale
            top = scores.max()
            weights = np.exp(scores - top)
            out[p, h] = weights @ values[h // group, new] / weights.sum()
            lse[p, h] = top + math.log(weights.sum())
    return out, lse


def random_past(count: int, k_seen: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Past queries [2, P, Hq, D], seen ids [2, P, Hq, S] (some -1), bounds [2, P] for a batch of 2."""
    past_q = torch.randn(2, count, HQ, D, generator=gen) * 1.5
    seen = torch.randint(SINK, T - WINDOW, (2, count, HQ, k_seen), generator=gen)
    seen[..., ::5] = -1
    seen_from = torch.randint(SINK + 50, T - WINDOW + 1, (2, count), generator=gen)
    if count > 1:
        seen_from[:, -1] = SINK  # the last past query saw everything already: nothing can be new
    return past_q, seen, seen_from


def assert_packed_equals(packed, got) -> None:
    """A packed reply holds exactly the four tensors of the unpacked one, and only itself."""
    assert packed.output is None and packed.lse is None and packed.past_output is None and packed.past_lse is None
    assert torch.equal(packed.ids, got.ids)
    rows = torch.cat([got.past_output, got.output.unsqueeze(-3)], dim=-3)
    lses = torch.cat([got.past_lse, got.lse.unsqueeze(-2)], dim=-2)
    assert torch.equal(packed.packed, torch.cat([rows, lses.unsqueeze(-1)], dim=-1))


@pytest.mark.parametrize("shm", [False, True])
def test_past_queries_match_brute_force(shared_daemon, sessions, shm):
    client = shared_daemon.client(shm=shm)
    sids = list(sessions)
    gen = torch.Generator().manual_seed(1)
    scale = D ** -0.5
    cases: set[bool] = set()  # saw a past query head with new keys (True) and one without (False)
    for layer, count, k in ((0, 1, 40), (1, 3, 100)):
        q = torch.randn(2, HQ, D, generator=gen) * 1.5
        past_q, seen, seen_from = random_past(count, 2 * k, gen)
        plain = client.retrieve(sids, layer, q, k=k)
        got = client.retrieve(sids, layer, q, k=k, past_queries=past_q, past_seen_ids=seen.int(),
                              past_seen_from=seen_from)
        assert client.uses_shared_memory == shm
        # the current query's answer is unchanged by the past queries
        assert torch.equal(got.ids, plain.ids)
        assert torch.equal(got.output, plain.output) and torch.equal(got.lse, plain.lse)
        assert got.past_output.shape == (2, count, HQ, D) and got.past_lse.shape == (2, count, HQ)
        assert plain.past_output is None and plain.past_lse is None
        assert_packed_equals(client.retrieve(sids, layer, q, k=k, past_queries=past_q, past_seen_ids=seen.int(),
                                             past_seen_from=seen_from, packed=True), got)
        # the past queries stacked in the queries tensor, current last: the same answer
        stacked = client.retrieve(sids, layer, torch.cat([past_q, q.unsqueeze(1)], dim=1), k=k,
                                  past_in_queries=count, past_seen_ids=seen.int(), past_seen_from=seen_from)
        for name in ("ids", "output", "lse", "past_output", "past_lse"):
            assert torch.equal(getattr(stacked, name), getattr(got, name)), name
        for i, sid in enumerate(sids):
            keys, values = sessions[sid]
            ref_out, ref_lse = reference_past(keys[layer], values[layer], got.ids[i], past_q[i], seen[i],
                                              seen_from[i], scale)
            lse = got.past_lse[i].double().numpy()
            assert np.array_equal(np.isinf(lse), np.isinf(ref_lse))
            finite = np.isfinite(ref_lse)
            cases.update(finite.reshape(-1).tolist())
            assert np.allclose(lse[finite], ref_lse[finite], atol=1e-5)
            assert np.allclose(got.past_output[i].double().numpy(), ref_out, atol=1e-5)
    assert cases == {True, False}
    client.close()


def test_single_session_and_optional_fields(shared_daemon, sessions):
    """One session id drops the batch axis; without seen ids every retrieved key below the bound is new,
    without a bound every retrieved key not in seen ids is."""
    client = shared_daemon.client()
    sid = next(iter(sessions))
    keys, values = sessions[sid]
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(HQ, D, generator=gen)
    past_q = torch.randn(2, HQ, D, generator=gen)
    bound = torch.tensor([120, T])
    only_bound = client.retrieve(sid, 0, q, k=30, past_queries=past_q, past_seen_from=bound)
    ref_out, ref_lse = reference_past(keys[0], values[0], only_bound.ids, past_q, None, bound, D ** -0.5)
    assert only_bound.past_output.shape == (2, HQ, D)
    assert np.allclose(only_bound.past_lse.double().numpy(), ref_lse, atol=1e-5)
    assert np.allclose(only_bound.past_output.double().numpy(), ref_out, atol=1e-5)
    # the retrieved ids themselves as seen ids: nothing is new, lse -inf and zero output
    seen = only_bound.ids.unsqueeze(0).expand(2, HQ, 30)
    nothing = client.retrieve(sid, 0, q, k=30, past_queries=past_q, past_seen_ids=seen)
    assert torch.isneginf(nothing.past_lse).all() and not nothing.past_output.any()
    # the current query as its own past query, nothing seen: the past answer is the current answer
    again = client.retrieve(sid, 0, q, k=30, past_queries=q.unsqueeze(0))
    assert torch.allclose(again.past_output[0], again.output, atol=1e-6)
    assert torch.allclose(again.past_lse[0], again.lse, atol=1e-6)
    # packed replies of one session, from the daemon's torch path (fp16) and its fused kernel (bf16)
    for one in sessions:
        args = dict(past_queries=past_q, past_seen_ids=seen[:, :, :7], past_seen_from=bound)
        assert_packed_equals(client.retrieve(one, 1, q, k=30, packed=True, **args),
                             client.retrieve(one, 1, q, k=30, **args))
    with pytest.raises(ValueError, match="packed needs past queries"):
        client.retrieve(sid, 0, q, k=30, packed=True)
    # one session, past queries stacked before the current one, packed reply: as the integration calls it
    for one in sessions:
        args = dict(past_seen_ids=seen[:, :, :7], past_seen_from=bound)
        assert_packed_equals(client.retrieve(one, 1, torch.cat([past_q, q.unsqueeze(0)]), k=30, past_in_queries=2,
                                             packed=True, **args),
                             client.retrieve(one, 1, q, k=30, past_queries=past_q, **args))
    with pytest.raises(ValueError, match="exclusive"):
        client.retrieve(sid, 0, torch.cat([past_q, q.unsqueeze(0)]), k=30, past_in_queries=2, past_queries=past_q)
    client.close()


def test_bad_past_queries(shared_daemon, sessions):
    sids = list(sessions)
    channel = grpc.insecure_channel(shared_daemon.target)
    stub = pb_grpc.KvdStub(channel)
    q = torch.randn(2, HQ, D)

    def request(mode: int = pb.ATTENTION, **past: torch.Tensor) -> pb.RetrieveRequest:
        message = pb.PastQueries(**{name: encode_inline(t) for name, t in past.items()})
        return pb.RetrieveRequest(session_ids=sids, layer=0, queries=encode_inline(q), k=8, mode=mode, past=message)

    def expect(req: pb.RetrieveRequest, *needles: str) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Retrieve(req)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        for needle in needles:
            assert needle in caught.value.details(), caught.value.details()

    good = torch.randn(2, 1, HQ, D)
    expect(request(mode=pb.IDS, queries=good), "mode ATTENTION")
    expect(request(mode=pb.IDS_KV, queries=good), "mode ATTENTION")
    expect(request(seen_ids=torch.zeros(2, 1, HQ, 3, dtype=torch.int64)), "past.queries is missing")
    expect(request(queries=torch.randn(2, 0, HQ, D)), "past.queries has shape [2, 0, 4, 16]")
    expect(request(queries=torch.randn(1, 1, HQ, D)), "past.queries has shape")
    expect(request(queries=torch.randn(2, 1, HQ + 1, D)), "past.queries has shape")
    expect(request(queries=torch.randn(2, 65, HQ, D)), "P <= 64")
    expect(request(queries=torch.randn(2, HQ, D)), "past.queries has shape")
    expect(request(queries=torch.ones(2, 1, HQ, D, dtype=torch.int64)), "past.queries has dtype int64")
    nan = good.clone()
    nan[1, 0, 2, 3] = float("nan")
    expect(request(queries=nan), "past.queries contains 1 NaN")
    expect(request(queries=good, seen_ids=torch.zeros(2, 1, HQ, 3)), "past.seen_ids has dtype float32")
    expect(request(queries=good, seen_ids=torch.zeros(2, 2, HQ, 3, dtype=torch.int64)), "past.seen_ids has shape")
    expect(request(queries=good, seen_ids=torch.zeros(2, 1, HQ, dtype=torch.int64)), "past.seen_ids has shape")
    expect(request(queries=good, seen_from=torch.zeros(2, dtype=torch.int64)), "past.seen_from has shape")
    expect(request(queries=good, seen_from=torch.zeros(2, 1)), "past.seen_from has dtype")
    truncated = encode_inline(good)
    truncated.inline = truncated.inline[:-4]
    expect(pb.RetrieveRequest(session_ids=sids, layer=0, queries=encode_inline(q), k=8,
                              past=pb.PastQueries(queries=truncated)), "past.queries", "bytes")
    stacked = pb.PastQueries(stacked=1)
    expect(pb.RetrieveRequest(session_ids=sids, layer=0, queries=encode_inline(q), k=8, past=stacked),
           "queries has shape [2, 4, 16], expected [n, 2, num_query_heads, head_dim] with past.stacked = 1")
    both = pb.PastQueries(stacked=1, queries=encode_inline(good))
    expect(pb.RetrieveRequest(session_ids=sids, layer=0, queries=encode_inline(torch.randn(2, 2, HQ, D)), k=8,
                              past=both), "exclusive")
    expect(pb.RetrieveRequest(session_ids=sids, layer=0, queries=encode_inline(torch.randn(2, 3, HQ, D)), k=8,
                              past=stacked), "past.stacked = 1")
    channel.close()
    # the client raises the typed error; the daemon keeps serving
    client = shared_daemon.client()
    with pytest.raises(InvalidArgumentError, match=r"past\.queries has shape"):
        client.retrieve(sids, 0, q, k=8, past_queries=torch.randn(2, 1, HQ, D - 1))
    with pytest.raises(ValueError, match="need past queries"):
        client.retrieve(sids, 0, q, k=8, past_seen_from=torch.zeros(2, 1, dtype=torch.int64))
    assert client.retrieve(sids, 0, q, k=8, past_queries=good).past_lse.shape == (2, 1, HQ)
    client.close()
