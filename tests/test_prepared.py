"""Prepared Retrieves (kvd_client.prepared, kvd.prepared) against the real daemon: each run equals an ordinary
Retrieve with the same arguments and the float64 attention over its ids; runs follow rewritten queries, layers
and ranges; errors are those of Retrieve; plans end with their connection or their region, are re-made after a
daemon restart, and fall back to ordinary Retrieves without a fast lane."""

from __future__ import annotations

import struct

import pytest
import torch
from kvd_client import FailedPreconditionError, InvalidArgumentError, KvdClient, NotFoundError
from kvd_client.fastlane import PREPARE, RELEASE, RELEASE_BODY, RUN, RUN_HEADER, FastLane
from kvd_client.prepared import NO_BOUND
from kvd_client.shm import ShmRegion

from kvd.v1 import kvd_pb2 as pb
from tests.reference import brute_topk, full_attention
from tests.test_index_manager import bf16_session

HQ, KV, D, N = 8, 2, 16, 400
SCALE = D ** -0.5


def fill(client: KvdClient, sid: str, seed: int, layers: int = 2, n: int = N, **options) -> tuple:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, KV, n, D, generator=g)
    values = torch.randn(layers, KV, n, D, generator=g)
    client.create_session(sid, num_layers=layers, num_kv_heads=KV, num_query_heads=HQ, head_dim=D, dtype="fp32",
                          **options)
    client.append(sid, 0, keys, values)
    return keys, values


def queries(seed: int, n: int | None = None) -> torch.Tensor:
    shape = (HQ, D) if n is None else (n, HQ, D)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def assert_same(run, ordinary) -> None:
    assert torch.equal(run.ids, ordinary.ids)
    assert torch.equal(run.output, ordinary.output) and torch.equal(run.lse, ordinary.lse)
    assert run.counts == ordinary.counts and run.index_kinds == ordinary.index_kinds


def test_runs_equal_ordinary_retrieves_and_the_float64_reference(shared_daemon):
    client = shared_daemon.client()
    kv = {sid: fill(client, sid, seed) for seed, sid in enumerate(["prep-a", "prep-b"])}
    plan = client.prepare_retrieve(["prep-a", "prep-b"], k=12, scale=SCALE)
    assert tuple(plan.queries.shape) == (2, HQ, D)
    for step, (layer, ranges) in enumerate([(0, None), (1, [(3, 350), (0, 0)]), (1, [(100, 120), (7, 9)])]):
        q = queries(step, 2)
        plan.queries.copy_(q)
        run = plan.run(layer, ranges)
        assert client.uses_fast_lane
        ordinary = client.retrieve(["prep-a", "prep-b"], layer, q, k=12, mode="attention", ranges=ranges,
                                   scale=SCALE)
        assert_same(run, ordinary)
        assert run.server_ms > 0 and run.promoted == [False, False]
        for i, sid in enumerate(["prep-a", "prep-b"]):
            keys, values = kv[sid]
            begin, end = (0, N) if ranges is None else (ranges[i][0], ranges[i][1] or N)
            expected = brute_topk(q[i], keys[layer], 12, begin, end)
            assert run.counts[i] == min(12, end - begin)
            for h in range(HQ):
                ids = run.ids[i, h, : run.counts[i]].tolist()
                assert sorted(ids) == sorted(expected[h])
                kv_head = slice(h // 4, h // 4 + 1)
                out, lse = full_attention(q[i, h:h + 1], keys[layer, kv_head], values[layer, kv_head], SCALE, ids)
                torch.testing.assert_close(run.output[i, h].double(), torch.from_numpy(out[0]), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(run.lse[i, h].double(), torch.tensor(lse[0]), rtol=1e-6, atol=1e-6)
    regions = client.stats().shared_memory_regions
    plan.close()
    assert client.stats().shared_memory_regions == regions - 1
    with pytest.raises(ValueError, match="closed"):
        plan.run(0)
    client.close()


def test_a_single_session_and_a_graph_index_served_in_place(shared_daemon):
    """One session id (no batch axis), a graph session with decode keys not yet in the graph: the fused region
    writes the plan's slots; the same ids and attention as an ordinary Retrieve."""
    client = shared_daemon.client()
    sid = "prep-graph"
    n, d, hq = 2500, 32, 4
    keys, values = bf16_session(client, sid, 21, n, 200)
    client.append(sid, n, keys[:, n:].unsqueeze(0), values[:, n:].unsqueeze(0))
    plan = client.prepare_retrieve(sid, k=30, query_dtype=torch.bfloat16)
    assert tuple(plan.queries.shape) == (hq, d) and plan.queries.dtype == torch.bfloat16
    for seed in (1, 2, 3):
        q = torch.randn(hq, d, generator=torch.Generator().manual_seed(seed)).bfloat16()
        plan.queries.copy_(q)
        run = plan.run(0)
        ordinary = client.retrieve(sid, 0, q, k=30, mode="attention")
        assert run.index_kinds == ["graph"] and run.attend_ms == 0.0   # one fused region
        assert_same(run, ordinary)
    plan.close()
    client.delete_session(sid)
    client.close()


def test_errors_are_those_of_retrieve(shared_daemon):
    client = shared_daemon.client()
    fill(client, "prep-err", 5)
    with pytest.raises(NotFoundError, match="missing"):
        client.prepare_retrieve("missing", k=3)
    with pytest.raises(ValueError, match="k must be positive"):
        client.prepare_retrieve("prep-err", k=0)
    client.create_session("prep-graph-params", num_layers=1, num_kv_heads=KV, num_query_heads=HQ, head_dim=D,
                          dtype="fp32", index="graph")
    regions = client.stats().shared_memory_regions
    with pytest.raises(InvalidArgumentError, match="graph search_params"):
        client.prepare_retrieve("prep-graph-params", k=3, search_params={"ef": "many"})
    assert client.stats().shared_memory_regions == regions, "a refused plan leaves no region behind"
    plan = client.prepare_retrieve("prep-err", k=3)
    plan.queries.copy_(queries(1))
    with pytest.raises(InvalidArgumentError, match="layer"):
        plan.run(2)
    with pytest.raises(InvalidArgumentError, match="outside"):
        plan.run(0, [(10, N + 1)])
    with pytest.raises(InvalidArgumentError, match="2 ranges given for 1 sequences"):
        plan.run(0, [(0, 0), (0, 0)])
    plan.queries[3, 5] = float("nan")
    with pytest.raises(InvalidArgumentError, match="1 NaN or infinite"):
        plan.run(0)
    plan.queries.copy_(queries(2))
    assert plan.run(0).counts == [3], "an error leaves the plan usable"
    client.delete_session("prep-err")
    with pytest.raises(NotFoundError, match="prep-err"):
        plan.run(0)
    client.create_session("prep-err", num_layers=1, num_kv_heads=KV, num_query_heads=HQ // 2, head_dim=D,
                          dtype="fp32")
    with pytest.raises(FailedPreconditionError, match="recreated with another shape"):
        plan.run(0)
    client.delete_session("prep-err")
    keys, _ = fill(client, "prep-err", 6, layers=1)   # recreated with the same shape: served, new data
    q = queries(3)
    plan.queries.copy_(q)
    assert sorted(plan.run(0).ids[0].tolist()) == sorted(brute_topk(q, keys[0], 3)[0])
    plan.close()
    client.close()


def test_plans_survive_a_daemon_restart_and_fall_back_without_a_fast_lane(kvd_daemon):
    client = kvd_daemon.client()
    fill(client, "prep-restart", 7)
    client.persist("prep-restart")
    plan = client.prepare_retrieve("prep-restart", k=9)
    plan.queries.copy_(queries(4))
    before = plan.run(1)
    ids, output = before.ids.clone(), before.output.clone()
    kvd_daemon.restart()
    again = plan.run(1)   # a new connection: the region registered and the plan prepared again
    assert client.uses_fast_lane
    assert torch.equal(again.ids, ids) and torch.equal(again.output, output)
    plan.close()
    client.close()
    slow = kvd_daemon.client(fast_lane=False)
    plan = slow.prepare_retrieve("prep-restart", k=9)
    plan.queries.copy_(queries(4))
    fallback = plan.run(1)
    assert not slow.uses_fast_lane
    assert torch.equal(fallback.ids, ids) and torch.equal(fallback.output, output)
    plan.close()
    slow.close()


def raw_template(region: ShmRegion, sid: str, k: int, output_at: int, output_bytes: int) -> pb.RetrieveRequest:
    return pb.RetrieveRequest(
        session_ids=[sid], k=k, mode=pb.ATTENTION,
        queries=pb.Tensor(dtype=pb.FLOAT32, shape=[1, HQ, D],
                          shm=pb.SharedMemoryRef(region=region.key, offset=0, byte_size=HQ * D * 4)),
        output=pb.SharedMemoryRef(region=region.key, offset=output_at, byte_size=output_bytes))


def raw_plan(daemon, sid: str) -> tuple:
    """A filled session, a registered 64 KiB region and a plan prepared over a raw fast-lane connection: queries at
    bytes [0, 512) of the region, output at [1024, 9216), k=4. Returns (client, region, lane, template, reply)."""
    client = daemon.client()
    fill(client, sid, 8)
    region = ShmRegion.create(1 << 16)
    client._register(region)
    lane = FastLane(daemon.socket + ".fast", None, 30)
    template = raw_template(region, sid, 4, 1024, 8192)
    reply = pb.PrepareRetrieveResponse.FromString(bytes(lane.call_raw(PREPARE, template.SerializeToString(), "p")))
    return client, region, lane, template, reply


def test_the_wire_protocol_refuses_bad_frames_and_forgets_released_plans(shared_daemon):
    client, region, lane, good, reply = raw_plan(shared_daemon, "prep-raw")
    plan_id = reply.plan_id
    assert list(reply.ids.shape) == [1, HQ, 4] and list(reply.lse.shape) == [1, HQ]
    assert reply.ids.shm.offset >= 1024
    lane.call_raw(RUN, RUN_HEADER.pack(plan_id, 0, 0), "r")
    bad_cases = [
        (RUN, RUN_HEADER.pack(plan_id + 99, 0, 0), NotFoundError, "no prepared Retrieve"),
        (RUN, RUN_HEADER.pack(plan_id, 0, 0)[:7], InvalidArgumentError, "at least 12 bytes"),
        (RUN, RUN_HEADER.pack(plan_id, 0, 1), InvalidArgumentError, "1 ranges has 28 bytes"),
        (RUN, RUN_HEADER.pack(plan_id, 0, 1) + struct.pack("<qq", -1, 5), InvalidArgumentError, "negative"),
        (PREPARE, raw_template(region, "prep-raw", 4, 256, 8192).SerializeToString(), InvalidArgumentError,
         "must not overlap"),
        (PREPARE, raw_template(region, "prep-raw", 4, 1024, 64).SerializeToString(), InvalidArgumentError,
         "too small"),
        (RELEASE, b"\x01", InvalidArgumentError, "one plan id"),
    ]
    inline = raw_template(region, "prep-raw", 4, 1024, 8192)
    inline.queries.inline = bytes(HQ * D * 4)
    bad_cases.append((PREPARE, inline.SerializeToString(), InvalidArgumentError, "in shared memory"))
    with_layer = raw_template(region, "prep-raw", 4, 1024, 8192)
    with_layer.layer = 1
    bad_cases.append((PREPARE, with_layer.SerializeToString(), InvalidArgumentError, "given with each run"))
    ids_mode = raw_template(region, "prep-raw", 4, 1024, 8192)
    ids_mode.mode = pb.IDS
    bad_cases.append((PREPARE, ids_mode.SerializeToString(), InvalidArgumentError, "mode ATTENTION"))
    unstacked = raw_template(region, "prep-raw", 4, 1024, 8192)
    unstacked.past.packed = True   # past queries in their own field: not a plan's form
    unstacked.past.queries.CopyFrom(unstacked.queries)
    bad_cases.append((PREPARE, unstacked.SerializeToString(), InvalidArgumentError, "stacked in its queries"))
    for kind, payload, error, message in bad_cases:
        with pytest.raises(error, match=message):
            lane.call_raw(kind, payload, "bad")
    lane.call_raw(RELEASE, RELEASE_BODY.pack(plan_id), "release")
    with pytest.raises(NotFoundError, match="no prepared Retrieve"):
        lane.call_raw(RUN, RUN_HEADER.pack(plan_id, 0, 0), "r")
    # the region unregistered under a live plan: the run is refused, the plan dropped
    reply = pb.PrepareRetrieveResponse.FromString(bytes(lane.call_raw(PREPARE, good.SerializeToString(), "p")))
    client._release(ShmRegion.attach(region.key, region.size))
    with pytest.raises(FailedPreconditionError, match="unregistered"):
        lane.call_raw(RUN, RUN_HEADER.pack(reply.plan_id, 0, 0), "r")
    with pytest.raises(NotFoundError, match="no prepared Retrieve"):
        lane.call_raw(RUN, RUN_HEADER.pack(reply.plan_id, 0, 0), "r")
    lane.close()
    region.close()
    client.close()


def test_a_connection_keeps_its_most_recently_used_plans(shared_daemon):
    """Plans a client dropped without releasing them do not pile up: beyond the limit the least recently run
    goes, and a client whose plan went prepares it again by itself."""
    from kvd.prepared import MAX_PLANS

    client = shared_daemon.client()
    fill(client, "prep-many", 9, layers=1)
    keep = client.prepare_retrieve("prep-many", k=2)
    keep.queries.copy_(queries(5))
    first = keep.run(0).ids.clone()
    others = [client.prepare_retrieve("prep-many", k=2) for _ in range(MAX_PLANS)]   # the last evicts `keep`
    assert torch.equal(keep.run(0).ids, first)   # prepared again transparently
    assert all(plan.run(0).counts == [2] for plan in others[-3:])
    for plan in others:
        plan.close()
    keep.close()
    client.close()


def test_the_decode_loop_makes_its_retrieves_through_one_plan(shared_daemon):
    """KVDCache(prepared=True), the default: every decode Retrieve is a run of one plan, with the logits of
    ordinary Retrieves (prepared=False) to the bit, at a k small enough for the retrieval to matter."""
    from tests.test_transformers_kvd import SMALL, KVDCache, kvd_steps, sid, tiny_llama

    model = tiny_llama(sharpen=3.0, seed=4)
    ids = torch.randint(1, 97, (2, 80 + 24), generator=torch.Generator().manual_seed(4))
    client = shared_daemon.client()
    logits = {}
    for prepared in (True, False):
        cache = KVDCache(client, session=[sid("plan-a"), sid("plan-b")], top_k=6, index="flat", prepared=prepared,
                         **SMALL)
        runs = []
        if prepared:
            real = cache._decode_plan

            def counting(sids, scale, real=real, runs=runs):
                plan = real(sids, scale)
                runs.append(plan)
                return plan

            cache._decode_plan = counting
        logits[prepared] = kvd_steps(model, cache, ids, 80)
        if prepared:
            assert len(runs) == cache.stats.retrieve_calls >= 2 * 24 and len({id(p) for p in runs}) == 1
        cache.close()
        assert cache._plans == {}
    assert torch.equal(logits[True], logits[False])
    client.close()


@pytest.mark.parametrize("kind", ["flat", "graph"])
def test_runs_with_past_queries_equal_ordinary_retro_retrieves(shared_daemon, kind):
    """RetroAttention through a plan (past=P stacked, seen ids and bounds rewritten per run, packed results):
    the ordinary Retrieve's packed reply to the bit, a bound of NO_BOUND as no bound at all, and each past row the
    float64 attention over the keys it had not seen."""
    client = shared_daemon.client()
    sid = f"prep-retro-{kind}"
    n, d, hq, k, count = 2500, 32, 4, 20, 2
    keys, values = bf16_session(client, sid, 31, n, kind=kind)
    plan = client.prepare_retrieve(sid, k=k, past=count, seen=k)
    assert tuple(plan.queries.shape) == (count + 1, hq, d) and tuple(plan.seen_ids.shape) == (count, hq, k)
    assert (plan.seen_from == NO_BOUND).all()
    gen = torch.Generator().manual_seed(33)
    previous = torch.full((hq, k), -1, dtype=torch.int64)
    for step in range(3):
        stacked = torch.randn(count + 1, hq, d, generator=gen) * 2
        seen = torch.stack([previous, torch.full((hq, k), -1, dtype=torch.int64)])
        bounds = torch.tensor([NO_BOUND, 1500]) if step else None
        plan.queries.copy_(stacked)
        plan.seen_ids.copy_(seen)
        plan.seen_from.copy_(bounds if bounds is not None else torch.full((count,), NO_BOUND))
        run = plan.run(0)
        ordinary = client.retrieve(sid, 0, stacked, k=k, mode="attention", past_in_queries=count, packed=True,
                                   past_seen_ids=seen, past_seen_from=bounds)
        assert run.output is None and run.lse is None
        assert torch.equal(run.ids, ordinary.ids) and torch.equal(run.packed, ordinary.packed)
        assert run.index_kinds == [kind]
        for p in range(count):
            bound = NO_BOUND if bounds is None else int(bounds[p])
            for h in range(hq):
                new = [i for i in run.ids[h].tolist() if 0 <= i < bound and i not in set(seen[p, h].tolist())]
                if not new:
                    assert run.packed[p, h, d] == float("-inf")
                    continue
                out, lse = full_attention(stacked[p, h:h + 1], keys[h // 2:h // 2 + 1].float(),
                                          values[h // 2:h // 2 + 1].float(), d ** -0.5, new)
                torch.testing.assert_close(run.packed[p, h, :d].double(), torch.from_numpy(out[0]), rtol=1e-5,
                                           atol=1e-6)
                torch.testing.assert_close(run.packed[p, h, d].double(), torch.tensor(lse[0]), rtol=1e-6, atol=1e-6)
        previous = run.ids.clone()
    plan.queries[0, 1, 3] = float("inf")   # a past query's value: checked with the stacked slot
    with pytest.raises(InvalidArgumentError, match="1 NaN or infinite"):
        plan.run(0)
    plan.queries.copy_(stacked)
    plan.close()
    fallback = shared_daemon.client(fast_lane=False)   # the same plan as ordinary Retrieves
    with fallback.prepare_retrieve(sid, k=k, past=count, seen=k) as slow:
        slow.queries.copy_(stacked)
        slow.seen_ids.copy_(seen)
        slow.seen_from.copy_(bounds)
        assert torch.equal(slow.run(0).packed, run.packed)
    fallback.close()
    client.delete_session(sid)
    client.close()


def test_a_batch_of_graph_sessions_writes_each_packed_block_in_place(shared_daemon):
    """Two graph sessions in one plan with a past query: the fused region writes each sequence's ids and packed
    block straight into the plan's slots (sequences run side by side); every run equals the ordinary batched
    Retrieve's reply, also the run after the past queries' seen ids and queries changed."""
    client = shared_daemon.client()
    sids = ["prep-batch-graph-a", "prep-batch-graph-b"]
    d, hq, k = 32, 4, 16
    for i, sid in enumerate(sids):
        bf16_session(client, sid, 41 + i, 2000)
    plan = client.prepare_retrieve(sids, k=k, past=1, seen=k)
    gen = torch.Generator().manual_seed(43)
    previous = torch.full((2, 1, hq, k), -1, dtype=torch.int64)
    for _ in range(3):
        stacked = torch.randn(2, 2, hq, d, generator=gen) * 2
        plan.queries.copy_(stacked)
        plan.seen_ids.copy_(previous)
        run = plan.run(0)
        ordinary = client.retrieve(sids, 0, stacked, k=k, mode="attention", past_in_queries=1, packed=True,
                                   past_seen_ids=previous)
        assert run.index_kinds == ["graph", "graph"] and run.attend_ms == 0.0  # the fused region served both
        assert torch.equal(run.ids, ordinary.ids) and torch.equal(run.packed, ordinary.packed)
        assert not torch.equal(run.packed[0], run.packed[1])
        assert torch.isfinite(run.packed[:, 0, :, d]).any()  # the past query attended new keys
        previous = run.ids.clone().unsqueeze(1)
    plan.close()
    for sid in sids:
        client.delete_session(sid)
    client.close()


def test_retro_decoding_through_plans_equals_ordinary_retrieves(shared_daemon):
    """KVDCache(retro=True, retro_window=3): the retro steps' Retrieves are runs of plans with past queries too,
    with the logits of ordinary Retrieves to the bit, while corrections happen (k is small)."""
    from tests.test_transformers_kvd import SMALL, KVDCache, kvd_steps, sid, tiny_llama

    model = tiny_llama(sharpen=3.0, seed=5)
    ids = torch.randint(1, 97, (1, 80 + 20), generator=torch.Generator().manual_seed(5))
    client = shared_daemon.client()
    logits = {}
    for prepared in (True, False):
        cache = KVDCache(client, session=sid("retro-plan"), top_k=6, index="flat", prepared=prepared, retro=True,
                         retro_window=3, **SMALL)
        logits[prepared] = kvd_steps(model, cache, ids, 80)
        if prepared:  # plans for 0, 1 and 2 past queries (the cache fills up over the first steps)
            assert {key[-2] for key in cache._plans} == {0, 1, 2}, list(cache._plans)
            assert cache.retro is not None and cache.retro.corrections > 0
        cache.close()
    assert torch.equal(logits[True], logits[False])
    client.close()


def test_plans_over_spilled_sessions_promote_them(daemon_factory):
    """A memory budget spills sessions to disk while their plans live: a run brings its session back (promoted),
    with the exact top-k, and the budget holds."""
    from tests.test_tiering import DIM, HEADS, create, expected_kv, fill

    daemon = daemon_factory(["--memory-budget", "600KiB"], tcp=False)
    client = daemon.client()
    n = 1024
    plans = []
    for i in range(6):
        create(client, f"pm{i}")
        fill(client, f"pm{i}", 20 + i, n, chunk=512)
        plans.append(client.prepare_retrieve(f"pm{i}", k=10))
    assert client.stats().sessions_on_disk >= 3
    q = torch.randn(HEADS, DIM, generator=torch.Generator().manual_seed(4))
    promoted = 0
    for i, plan in enumerate(plans):
        plan.queries.copy_(q)
        run = plan.run(1)
        keys, _ = expected_kv(20 + i, n, 512)
        assert [sorted(row) for row in run.ids.tolist()] == [sorted(row) for row in brute_topk(q, keys[1], 10)]
        promoted += run.promoted[0]
        plan.close()
    stats = client.stats()
    assert promoted >= 3 and stats.memory_bytes <= stats.memory_budget_bytes
    client.close()
