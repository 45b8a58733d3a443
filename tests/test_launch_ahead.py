"""Split prepared runs (PreparedRetrieve.start / finish, the fast lane's RUN_SIGNALLED) and the integration's
launch-ahead decode built on them, against the real daemon.

A split run's results must be in the plan's slots, and its signal word stored, before the daemon replies; also when
the run fails (a device stream may be waiting on the word). On CUDA the device waits on that word; here a host
stand-in (HostWaiter) spins on it instead, so the integration's launch-ahead path runs on the CPU with the same
order of steps: the logits must equal those of the blocking path to the bit."""

from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest
import torch
from kvd_client import InvalidArgumentError, NotFoundError
from kvd_client.fastlane import RUN_HEADER, RUN_SIGNALLED, SIGNAL

from tests.test_prepared import SCALE, assert_same, fill, queries, raw_plan


def one_session_plan(client, sid: str, seed: int, k: int, query_seed: int, persist: bool = False):
    """A filled 2-layer session and a plan over it, its queries written; returns (plan, queries)."""
    fill(client, sid, seed)
    if persist:
        client.persist(sid)
    plan = client.prepare_retrieve(sid, k=k)
    q = queries(query_seed)
    plan.queries.copy_(q)
    return plan, q


def test_split_runs_equal_runs_and_the_daemon_stores_their_signal(shared_daemon):
    client = shared_daemon.client()
    for seed, sid in enumerate(["split-a", "split-b"]):
        fill(client, sid, seed)
    plan = client.prepare_retrieve(["split-a", "split-b"], k=12, scale=SCALE)
    word = plan.signal_word()
    assert word is not None and word[0] == 0
    for step, (layer, ranges) in enumerate([(0, None), (1, [(3, 350), (0, 0)]), (0, [(100, 120), (7, 9)])]):
        q = queries(step, 2)
        plan.queries.copy_(q)
        value = plan.start(layer, ranges)
        assert value == step + 1
        with pytest.raises(ValueError, match="finish"):
            plan.start(layer, ranges)
        split = plan.finish()
        assert word[0] == value   # stored by the daemon: this client writes it only when a run failed
        slots = plan.slots()
        assert split.output.data_ptr() == slots["output"].data_ptr()   # the results are the slots themselves
        ordinary = client.retrieve(["split-a", "split-b"], layer, q, k=12, mode="attention", ranges=ranges,
                                   scale=SCALE)
        assert_same(split, ordinary)
    with pytest.raises(ValueError, match="no started run"):
        plan.finish()
    plan.close()
    client.close()


def test_a_failed_split_run_still_stores_its_signal_and_raises_at_finish(shared_daemon):
    client = shared_daemon.client()
    plan, _ = one_session_plan(client, "split-fail", 3, 5, 1)
    value = plan.start(7)   # the session has 2 layers
    with pytest.raises(InvalidArgumentError, match="layer"):
        plan.finish()
    assert plan.signal_word()[0] == value
    plan.queries.copy_(queries(2))
    assert plan.start(1) == value + 1   # the plan and its connection go on
    assert plan.finish().counts == [5]
    plan.close()
    client.close()


def test_another_call_on_the_connection_reads_a_pending_reply_first(shared_daemon):
    client = shared_daemon.client()
    plan, q = one_session_plan(client, "split-pending", 4, 7, 3)
    plan.start(1)
    # a Retrieve over the same fast lane while the run's reply is unread: both replies reach their callers
    other = client.retrieve("split-pending", 0, q, k=3, mode="ids")
    assert client.uses_fast_lane
    assert torch.equal(other.ids, client.retrieve("split-pending", 0, q, k=3, mode="ids").ids)
    split = plan.finish()
    assert_same(split, client.retrieve("split-pending", 1, q, k=7, mode="attention"))
    plan.close()
    client.close()


def test_a_split_run_cut_off_by_a_daemon_restart_is_made_again_at_finish(kvd_daemon):
    client = kvd_daemon.client()
    plan, _ = one_session_plan(client, "split-restart", 5, 9, 6, persist=True)
    expected = plan.run(1)
    ids, output = expected.ids.clone(), expected.output.clone()
    plan.slots()["output"].zero_()
    kvd_daemon.stop()
    value = plan.start(1)   # sent on a connection whose daemon is gone, or refused at once
    kvd_daemon.start()
    if value is None:   # the send itself failed: the caller makes the blocking run
        again = plan.run(1)
    else:
        again = plan.finish()   # no reply: made again on a new connection, its results put in the slots
        assert plan.signal_word()[0] == value
    assert torch.equal(again.ids, ids) and torch.equal(plan.slots()["output"], output)
    plan.close()
    client.close()


def test_the_signal_is_stored_when_the_daemon_dies_mid_run(kvd_daemon):
    """A device stream waiting on a run whose daemon died would wait forever, and so might the thread meant to read
    the reply (a CUDA call that waits for that stream): the client's watch stores the word once the connection
    hangs up, without anyone reading it."""
    client = kvd_daemon.client()
    plan, _ = one_session_plan(client, "split-died", 9, 9, 8, persist=True)
    expected = plan.run(1).ids.clone()
    os.kill(kvd_daemon.proc.pid, signal.SIGSTOP)   # the run is sent but not served
    value = plan.start(1)
    assert value is not None
    time.sleep(0.5)
    assert plan.signal_word()[0] != value
    kvd_daemon.kill()
    deadline = time.monotonic() + 10
    while plan.signal_word()[0] != value:
        assert time.monotonic() < deadline, "the watch never stored the signal"
        time.sleep(0.05)
    kvd_daemon.start()
    assert torch.equal(plan.finish().ids, expected)   # made again on a new connection
    plan.close()
    client.close()


def test_signal_words_outside_the_region_or_on_the_plan_tensors_are_refused(shared_daemon):
    client, region, lane, _, reply = raw_plan(shared_daemon, "split-raw")   # queries [0, 512), output [1024, 9216)
    run = RUN_HEADER.pack(reply.plan_id, 0, 0)
    word = torch.frombuffer(region.buffer[768:772], dtype=torch.int32)
    lane.call_raw(RUN_SIGNALLED, SIGNAL.pack(768, 41) + run, "r")
    assert int(word[0]) == 41
    for offset, message in [(769, "4-aligned"), (1 << 16, "inside the plan's region"), (256, "overlaps"),
                            (2048, "overlaps")]:
        with pytest.raises(InvalidArgumentError, match=message):
            lane.call_raw(RUN_SIGNALLED, SIGNAL.pack(offset, 42) + run, "bad")
    with pytest.raises(InvalidArgumentError, match="at least"):
        lane.call_raw(RUN_SIGNALLED, SIGNAL.pack(768, 42), "short")
    with pytest.raises(NotFoundError, match="no prepared Retrieve"):
        lane.call_raw(RUN_SIGNALLED, SIGNAL.pack(768, 42) + RUN_HEADER.pack(reply.plan_id + 5, 0, 0), "unknown")
    assert int(word[0]) == 41
    lane.close()
    region.close()
    client.close()


class HostEvent:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostWaiter:
    """launch_ahead.StreamWaiter's methods on the host: "registering" records the region, and the stream's wait
    is this thread spinning until the signal word has reached the value (as cuStreamWaitValue32's GEQ)."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}
        self.waits = 0

    def register(self, address: int, size: int) -> int:
        self.registered[address] = size
        return address

    def unregister(self, address: int) -> None:
        del self.registered[address]

    def wait(self, stream: object, address: int, value: int) -> None:
        word = ctypes.c_uint32.from_address(address)
        deadline = time.monotonic() + 60
        while (word.value - value) & 0xFFFFFFFF >= 1 << 31:
            assert time.monotonic() < deadline, "the signal word was never stored"
        self.waits += 1

    def stream(self, device: torch.device) -> None:
        return None

    def event(self) -> HostEvent:
        return HostEvent()

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("batch", [1, 2])
def test_launch_ahead_decoding_gives_the_logits_of_the_blocking_path(shared_daemon, monkeypatch, batch):
    """Every decode Retrieve after the first decode forward is a split run; the device side (here HostWaiter)
    waits for the signal and reads the slots, and the reply is read at the next layer. Same logits to the bit."""
    from kvd_transformers import KVDCache
    from kvd_transformers.launch_ahead import ahead_threads

    from tests.test_transformers_kvd import SMALL, kvd_steps, sid, tiny_llama

    model = tiny_llama(sharpen=3.0, seed=5)
    ids = torch.randint(1, 97, (batch, 80 + 24), generator=torch.Generator().manual_seed(5))
    client = shared_daemon.client()
    waiter = HostWaiter()
    monkeypatch.setattr(KVDCache, "_waiter", staticmethod(lambda device: waiter))
    logits = {}
    for ahead in (True, False):
        cache = KVDCache(client, session=[sid(f"ahead-{i}") for i in range(batch)], top_k=6, index="flat",
                         launch_ahead=ahead, **SMALL)
        logits[ahead] = kvd_steps(model, cache, ids, 80)
        layers = cache.num_layers
        if ahead:
            # 24 decode forwards: the first blocks (kernel loading), each later one splits every layer's run
            assert cache.stats.ahead_runs == waiter.waits == 23 * layers
            assert len(waiter.registered) == 1 and cache._ahead_started is None
            (plan,) = cache._plans.values()   # its runs leave a core to the model's thread
            assert plan.search_params == {"threads": str(ahead_threads())}
        else:
            assert cache.stats.ahead_runs == 0
        assert cache.stats.retrieve_calls == 24 * layers
        cache.close()
        assert waiter.registered == {} and cache._plans == {}
    assert torch.equal(logits[True], logits[False])
    client.close()


def test_a_failed_launch_ahead_run_stops_the_forward(shared_daemon, monkeypatch):
    """The device has used whatever the slots held; the error must surface before the forward returns logits."""
    import kvd_transformers
    from kvd_client import KvdError
    from kvd_transformers import KVDCache

    from tests.test_transformers_kvd import SMALL, sid, tiny_llama

    model = tiny_llama(sharpen=3.0, seed=6)
    kvd_transformers.enable(model)
    ids = torch.randint(1, 97, (1, 90), generator=torch.Generator().manual_seed(6))
    client = shared_daemon.client()
    waiter = HostWaiter()
    monkeypatch.setattr(KVDCache, "_waiter", staticmethod(lambda device: waiter))
    name = sid("ahead-fail")
    cache = KVDCache(client, session=name, top_k=6, index="flat", **SMALL)
    with torch.no_grad():
        model(ids[:, :80], past_key_values=cache)
        for t in range(80, 83):
            model(ids[:, t:t + 1], past_key_values=cache)
        assert cache.stats.ahead_runs > 0
        client.delete_session(name)
        with pytest.raises(KvdError):
            model(ids[:, 83:84], past_key_values=cache)
    assert cache._ahead_started is None
    cache._close_plans()
    assert waiter.registered == {}
    client.close()


@pytest.mark.parametrize(("window", "batch"), [(2, 2), (3, 1)])
def test_launch_ahead_retro_steps_give_the_logits_of_blocking_retro_steps(shared_daemon, monkeypatch, window,
                                                                          batch):
    """RetroAttention's steps split their runs too: the cached queries are written once the previous run read its
    inputs, all rows merge on the device side, and the seen ids and the commit follow the reply. Corrections happen
    (k is small); the logits equal those of blocking retro steps to the bit."""
    from kvd_transformers import KVDCache

    from tests.test_transformers_kvd import SMALL, kvd_steps, sid, tiny_llama

    model = tiny_llama(sharpen=3.0, seed=7)
    ids = torch.randint(1, 97, (batch, 80 + 20), generator=torch.Generator().manual_seed(7))
    client = shared_daemon.client()
    waiter = HostWaiter()
    monkeypatch.setattr(KVDCache, "_waiter", staticmethod(lambda device: waiter))
    logits, corrections = {}, {}
    for ahead in (True, False):
        cache = KVDCache(client, session=[sid(f"ahead-retro-{i}") for i in range(batch)], top_k=6, index="flat",
                         retro=True, retro_window=window, launch_ahead=ahead, **SMALL)
        logits[ahead] = kvd_steps(model, cache, ids, 80)
        assert cache.retro is not None
        corrections[ahead] = cache.retro.corrections
        assert (cache.stats.ahead_runs == 19 * cache.num_layers) is ahead
        cache.close()
    assert corrections[True] == corrections[False] > 0
    assert torch.equal(logits[True], logits[False])
    client.close()


def test_two_chat_turns_through_generate_match_the_blocking_path(shared_daemon, monkeypatch):
    """generate() with sampling, then a second turn that continues the stored session in a new cache: its prompt
    is a multi-token forward right after launch-ahead decode steps. Tokens and scores equal the blocking path's."""
    import kvd_transformers
    from kvd_transformers import KVDCache

    from tests.test_transformers_kvd import SMALL, generate, sid, tiny_llama

    model = tiny_llama(sharpen=3.0, seed=8)
    kvd_transformers.enable(model)
    waiter = HostWaiter()
    monkeypatch.setattr(KVDCache, "_waiter", staticmethod(lambda device: waiter))
    prompt = torch.randint(1, 97, (1, 90), generator=torch.Generator().manual_seed(8))
    more = torch.randint(1, 97, (1, 25), generator=torch.Generator().manual_seed(9))
    client = shared_daemon.client()
    runs = {}
    for ahead in (True, False):
        session = sid(f"ahead-chat-{int(ahead)}")
        cache = KVDCache(client, session=session, top_k=6, index="flat", launch_ahead=ahead, **SMALL)
        torch.manual_seed(10)
        with torch.no_grad():
            turn1 = model.generate(prompt, past_key_values=cache, max_new_tokens=16, do_sample=True, top_k=20,
                                   output_scores=True, return_dict_in_generate=True)
        cache.close()
        history = torch.cat([turn1.sequences, more], dim=1)
        cache = KVDCache(client, session=session, top_k=6, index="flat", launch_ahead=ahead, **SMALL)
        turn2 = generate(model, history, cache, 16)
        assert (cache.stats.ahead_runs > 0) is ahead
        cache.close()
        runs[ahead] = (turn1, turn2)
    for got, want in zip(runs[True], runs[False], strict=True):
        assert torch.equal(got.sequences, want.sequences)
        assert all(torch.equal(a, b) for a, b in zip(got.scores, want.scores, strict=True))
    client.close()


class RefusingWaiter(HostWaiter):
    """A device that refuses to page-lock the region ("register") or to make a stream wait ("wait")."""

    def __init__(self, refuses: str) -> None:
        super().__init__()
        self.refuses = refuses

    def register(self, address: int, size: int) -> int:
        if self.refuses == "register":
            raise RuntimeError("cudaHostRegister of a plan's region failed (cudaError 1)")
        return super().register(address, size)

    def wait(self, stream: object, address: int, value: int) -> None:
        if self.refuses == "wait":
            raise RuntimeError("cuStreamWaitValue32 failed (CUresult 801)")
        super().wait(stream, address, value)


@pytest.mark.parametrize("refuses", ["register", "wait"])
def test_a_device_that_refuses_launch_ahead_falls_back_to_the_blocking_path(shared_daemon, monkeypatch, refuses):
    """A warning, then blocking decode steps with the same logits; a run already sent is read by this thread."""
    from kvd_transformers import KVDCache

    from tests.test_transformers_kvd import SMALL, kvd_steps, sid, tiny_llama

    model = tiny_llama(sharpen=3.0, seed=11)
    ids = torch.randint(1, 97, (1, 80 + 8), generator=torch.Generator().manual_seed(11))
    client = shared_daemon.client()
    logits = {}
    for waiter in (RefusingWaiter(refuses), None):
        monkeypatch.setattr(KVDCache, "_waiter", staticmethod(lambda device, waiter=waiter: waiter))
        cache = KVDCache(client, session=sid("ahead-refused"), top_k=6, index="flat", **SMALL)
        if waiter is None:
            logits[False] = kvd_steps(model, cache, ids, 80)
        else:
            with pytest.warns(RuntimeWarning, match="launch-ahead is off"):
                logits[True] = kvd_steps(model, cache, ids, 80)
            assert cache.stats.ahead_runs == 0
        assert cache.stats.retrieve_calls == 8 * cache.num_layers
        cache.close()
        assert waiter is None or waiter.registered == {}
    assert torch.equal(logits[True], logits[False])
    client.close()
