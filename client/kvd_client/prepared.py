"""Prepared Retrieves: the decode loop's per-layer call, set up once and then run with a few bytes.

    plan = client.prepare_retrieve(session_ids, k=100)
    for layer in ...:
        plan.queries.copy_(q)                      # [n, Hq, D]: a view of shared memory
        result = plan.run(layer, ranges)           # result.output / result.lse: views, valid until the next run

With past queries (RetroAttention): prepare_retrieve(..., past=P, seen=S) adds plan.seen_ids / plan.seen_from,
and results come packed.

A run can also be split (a device that consumes the results before the client has read the reply):

    value = plan.start(layer, ranges)              # sent; None: no fast lane now, use run()
    ...                                            # plan.signal_word(): stored `value` once the results are in
    result = plan.finish()                         # the reply (errors raise here)

If the daemon dies before storing the word, the client's watch (kvd_client.signal_watch) stores it.

A mode "attention" Retrieve whose sessions, k, scale, exact and search params stay the same from call to call.
Over the daemon's fast lane the plan is validated once; each run sends the plan id, the layer and the ranges and
gets counts and timings back, the tensors staying in a shared-memory region of the plan's own (no protobuf on
either side, no per-call shared-memory lookups). Without a fast lane (a remote daemon, shm off) run() makes an
ordinary Retrieve with the same arguments: the same results, without the saving.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch

from kvd.v1 import kvd_pb2 as pb
from kvd_client import calls, wire
from kvd_client.errors import KvdError, NotFoundError
from kvd_client.fastlane import (
    PREPARE,
    RELEASE,
    RELEASE_BODY,
    RUN,
    RUN_HEADER,
    RUN_REPLY,
    RUN_SEQUENCE,
    RUN_SIGNALLED,
    SIGNAL,
    FastLane,
)
from kvd_client.shm import ShmRegion
from kvd_client.signal_watch import WATCH
from kvd_client.transport import Placer
from kvd_client.types import SERVED_BY_NAMES, RetrieveResult

if TYPE_CHECKING:
    from kvd_client.client import KvdClient

_QUERY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


NO_BOUND = 1 << 62  # a past query's seen_from when it has no bound (every retrieved position may be new to it)


@dataclass
class _Started:
    """A run begun by start(): what finish() needs to read its reply or to run it again."""
    layer: int
    ranges: Sequence[tuple[int, int]] | None
    value: int
    reply: bytearray | KvdError | None = None  # set when the lane reads the reply


class PreparedRetrieve:
    """A mode "attention" Retrieve prepared once and run per layer (KvdClient.prepare_retrieve). Not for use by
    several threads at once; runs are serialized with the client's other calls.

    With past=P (RetroAttention, see KvdClient.retrieve): `queries` is [n, P + 1, Hq, D] (the P past queries,
    then the current one), `seen_ids` int64 [n, P, Hq, seen] and `seen_from` int64 [n, P] (NO_BOUND: none) are
    rewritten before each run too, and results come as `packed` [n, P + 1, Hq, D + 1] (lse in the last column)."""

    def __init__(self, client: KvdClient, session_ids: str | Sequence[str], *, k: int, scale: float | None = None,
                 exact: bool = False, search_params: dict[str, Any] | None = None,
                 query_dtype: torch.dtype = torch.float32, past: int = 0, seen: int = 0) -> None:
        if query_dtype not in _QUERY_DTYPES:
            raise ValueError(f"query_dtype must be float32, bfloat16 or float16, not {query_dtype}")
        if k < 1:
            raise ValueError(f"k must be positive, not {k}")
        if past < 0 or seen < 0 or (seen and not past):
            raise ValueError("past and seen must be >= 0, and seen ids need past queries")
        self.client = client
        self.single = isinstance(session_ids, str)
        self.session_ids = [session_ids] if isinstance(session_ids, str) else list(session_ids)
        if not self.session_ids:
            raise ValueError("a prepared Retrieve needs at least one session")
        info = client._shape(self.session_ids[0])
        n, heads, dim = len(self.session_ids), info.num_query_heads, info.head_dim
        self.k, self.scale, self.exact, self.past = k, scale, exact, past
        self.search_params = {key: str(v) for key, v in (search_params or {}).items()}
        self._heads, self._dim = heads, dim
        # the inputs rewritten before each run: name -> (dtype, shape); laid out in this order in the region
        self._inputs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            "queries": (query_dtype, (n, past + 1, heads, dim) if past else (n, heads, dim))}
        if past:
            if seen:
                self._inputs["seen_ids"] = (torch.int64, (n, past, heads, seen))
            self._inputs["seen_from"] = (torch.int64, (n, past))
        self._region: ShmRegion | None = None
        self._lane: FastLane | None = None   # the connection the plan lives on
        self._plan_id = 0
        self._views: tuple[torch.Tensor, ...] | None = None
        self._started: _Started | None = None
        self._signal: np.ndarray | None = None  # the signal word (uint32) of split runs, in the region
        self.signal_offset = -1
        self._signal_value = 0
        self.closed = False
        with client._lock:
            if client._transport.enabled and client._fast_lane_wanted:
                self._open_region()
            if (lane := client._lane() if self._region is not None else None) is not None:
                try:
                    self._prepare(lane)  # the template's errors surface here
                except KvdError:
                    if lane.broken:
                        client._drop_lane()  # the first run tries again
                    else:
                        self._release_region()
                        raise
        inputs = self._input_tensors()
        self.queries = inputs["queries"]
        self.seen_ids: torch.Tensor | None = inputs.get("seen_ids")
        self.seen_from: torch.Tensor | None = inputs.get("seen_from")
        if self.seen_from is not None:
            self.seen_from.fill_(NO_BOUND)
        client._plans.add(self)

    # -- set-up ----------------------------------------------------------------------------------------

    def _layout(self) -> tuple[dict[str, int], int]:
        """Byte offsets of the inputs in the region (and of the signal word, "signal", after them) and where the
        output area starts."""
        offsets, cursor = {}, 0
        for name, (dtype, shape) in self._inputs.items():
            offsets[name] = cursor = wire.align(cursor)
            cursor += wire.byte_size(shape, dtype)
        offsets["signal"] = cursor = wire.align(cursor)
        return offsets, wire.align(cursor + 4)

    def _open_region(self) -> None:
        """The plan's own shared memory (inputs, then the results), registered with the daemon; left unset
        (ordinary Retrieves) where the daemon cannot map it or offers no fast lane."""
        n = len(self.session_ids)
        _, output_at = self._layout()
        size = output_at + calls.retrieve_output_bytes(n, self._heads, self.k, self._dim, "attention", 4, self.past)
        region = ShmRegion.create(size)
        try:
            self.client._register(region)
        except KvdError:
            region.close()
            return
        self._region = region
        self._finalizer = weakref.finalize(self, region.close)
        if not self.client._fast_path:
            self._release_region()

    def _input_tensors(self) -> dict[str, torch.Tensor]:
        """The inputs as views of the region, or as plain tensors without one (ordinary Retrieves)."""
        offsets, _ = self._layout()
        tensors = {}
        if self._region is not None:
            at = self.signal_offset = offsets["signal"]
            self._signal = np.frombuffer(self._region.buffer[at: at + 4], dtype=np.uint32)
        for name, (dtype, shape) in self._inputs.items():
            if self._region is None:
                tensor = torch.zeros(shape, dtype=dtype)
            else:
                at = offsets[name]
                tensor = wire.decode_bytes(self._region.buffer[at: at + wire.byte_size(shape, dtype)], dtype, shape)
            tensors[name] = tensor[0] if self.single else tensor
        return tensors

    def _tensor_ref(self, name: str, offsets: dict[str, int]) -> pb.Tensor:
        assert self._region is not None
        dtype, shape = self._inputs[name]
        return pb.Tensor(dtype=wire.WIRE_BY_TORCH[dtype], shape=list(shape), shm=pb.SharedMemoryRef(
            region=self._region.key, offset=offsets[name], byte_size=wire.byte_size(shape, dtype)))

    def _prepare(self, lane: FastLane) -> None:
        """Send the plan's template on `lane` (its region registered again first if the daemon forgot it)."""
        assert self._region is not None
        key = self._region.key
        offsets, output_at = self._layout()
        request = pb.RetrieveRequest(
            session_ids=self.session_ids, k=self.k, mode=pb.ATTENTION, scale=self.scale or 0.0, exact=self.exact,
            search_params=self.search_params, queries=self._tensor_ref("queries", offsets),
            output=pb.SharedMemoryRef(region=key, offset=output_at, byte_size=self._region.size - output_at))
        if self.past:
            request.past.stacked, request.past.packed = self.past, True
            request.past.seen_from.CopyFrom(self._tensor_ref("seen_from", offsets))
            if "seen_ids" in self._inputs:
                request.past.seen_ids.CopyFrom(self._tensor_ref("seen_ids", offsets))
        try:
            payload = lane.call_raw(PREPARE, request.SerializeToString(), "PrepareRetrieve")
        except NotFoundError as exc:
            if f"region {key!r} is not registered" not in exc.details:
                raise
            self.client._register(self._region)  # a restarted daemon: register the region again
            payload = lane.call_raw(PREPARE, request.SerializeToString(), "PrepareRetrieve")
        reply = pb.PrepareRetrieveResponse.FromString(bytes(payload))
        results = (reply.ids, reply.packed) if self.past else (reply.ids, reply.output, reply.lse)
        self._views = tuple(self._view(t) for t in results)
        self._plan_id, self._lane = reply.plan_id, lane

    def _view(self, message: pb.Tensor) -> torch.Tensor:
        assert self._region is not None
        view = Placer(self._region, self._region.key).view(message)
        return view[0] if self.single else view

    # -- runs ------------------------------------------------------------------------------------------

    def run(self, layer: int, ranges: Sequence[tuple[int, int]] | None = None) -> RetrieveResult:
        """Attention of the current `queries` over the top-k keys of `layer` (ranges: per sequence (begin, end),
        end 0 = the session's length; default: each session's offloaded part). The result's ids, output and lse
        are views that the next run overwrites."""
        if self.closed:
            raise ValueError("this prepared Retrieve is closed")
        if layer < 0:
            raise ValueError(f"layer must not be negative, not {layer}")
        count = 0 if ranges is None else len(ranges)
        bounds = struct.pack(f"<{2 * count}q", *(int(x) for pair in ranges for x in pair)) if ranges else b""
        with self.client._lock:
            for attempt in (0, 1):
                lane = self.client._lane() if self._region is not None else None
                if lane is None:
                    return self._retrieve(layer, ranges)
                try:
                    if lane is not self._lane:
                        self._prepare(lane)  # first run, or a new connection (the daemon restarted)
                    reply = lane.call_raw(RUN, RUN_HEADER.pack(self._plan_id, layer, count) + bounds,
                                          "RetrievePrepared")
                except KvdError as exc:
                    if lane.broken:
                        self.client._drop_lane()
                        if attempt == 0:
                            continue  # a read-only call: try again on a new connection
                    elif attempt == 0 and isinstance(exc, NotFoundError) and "no prepared Retrieve" in exc.details:
                        self._lane = None  # the daemon let the plan go (its connection's plan limit): prepare again
                        continue
                    elif attempt == 0 and exc.code is grpc.StatusCode.FAILED_PRECONDITION \
                            and "unregistered" in exc.details:
                        self._lane = None  # the daemon dropped the plan with its region: prepare both again
                        self.client._register(self._region)
                        continue
                    raise
                return self._result(reply)
        raise AssertionError("unreachable")

    def start(self, layer: int, ranges: Sequence[tuple[int, int]] | None = None) -> int | None:
        """Begin a run whose reply finish() reads; returns the value that the plan's signal word (signal_word())
        holds once the results are in the plan's slots (slots()), or None when the run cannot be split now (no
        fast lane: use run()). Until finish(), the plan takes no other run."""
        if self.closed:
            raise ValueError("this prepared Retrieve is closed")
        if layer < 0:
            raise ValueError(f"layer must not be negative, not {layer}")
        if self._started is not None:
            raise ValueError("finish() the started run first")
        count = 0 if ranges is None else len(ranges)
        bounds = struct.pack(f"<{2 * count}q", *(int(x) for pair in ranges for x in pair)) if ranges else b""
        value = (self._signal_value + 1) & 0xFFFFFFFF
        with self.client._lock:
            lane = self.client._lane() if self._signal is not None else None
            if lane is None:
                return None
            try:
                if lane is not self._lane:
                    self._prepare(lane)
                started = _Started(layer, ranges, value)
                lane.send_only(RUN_SIGNALLED, SIGNAL.pack(self.signal_offset, value)
                               + RUN_HEADER.pack(self._plan_id, layer, count) + bounds, "RetrievePrepared",
                               lambda reply: setattr(started, "reply", reply))
            except KvdError:
                if lane.broken:
                    self.client._drop_lane()
                return None
            self._signal_value, self._started = value, started
            signal = self._signal
            WATCH.watch(id(self), lane.sock, lambda: signal.__setitem__(0, value))
            return value

    def finish(self) -> RetrieveResult:
        """The reply of the run that start() began. Where it brought none or an error, the run is made again here
        (run(): a new connection, a plan the daemon let go; a lasting error raises again), its results copied into
        the slots and the signal stored."""
        started, self._started = self._started, None
        if started is None:
            raise ValueError("no started run to finish")
        WATCH.forget(id(self))
        with self.client._lock:
            lane = self._lane
            if started.reply is None and lane is not None:
                lane.collect()
            if lane is not None and lane.broken:
                self.client._drop_lane()
        if isinstance(started.reply, bytearray):
            return self._result(started.reply)
        # no reply, or an error: run() makes the run again (preparing the plan again where the daemon lost it) or
        # raises the run's error; either way the slots hold its results and the signal is stored
        assert self._signal is not None
        try:
            result = self.run(started.layer, started.ranges)
            self._fill_slots(result)
        finally:
            self._signal[0] = started.value
        return result

    def signal_word(self) -> np.ndarray | None:
        """The uint32 word (a view of the plan's region, at byte signal_offset) that split runs store their value
        in; None without a region."""
        return self._signal

    def shared_memory(self) -> memoryview | None:
        """The plan's whole shared-memory region (inputs, signal word, slots); None without one."""
        return None if self._region is None else self._region.buffer

    def slots(self) -> dict[str, torch.Tensor] | None:
        """The views of the region that runs write their results to (ids, output, lse; with past queries ids,
        packed); None before the plan was prepared on the daemon."""
        if self._views is None:
            return None
        return dict(zip(("ids", "packed") if self.past else ("ids", "output", "lse"), self._views, strict=True))

    def _fill_slots(self, result: RetrieveResult) -> None:
        """Copy a result made elsewhere (an ordinary Retrieve) into the slots, where a started run's reader looks."""
        for name, slot in (self.slots() or {}).items():
            got = getattr(result, name)
            if got is not None and got.data_ptr() != slot.data_ptr():
                slot.copy_(got)

    def _result(self, reply: bytearray) -> RetrieveResult:
        server, search, attend, search_kernel, attend_kernel = RUN_REPLY.unpack_from(reply)
        counts, kinds, promoted = [], [], []
        for i in range(len(self.session_ids)):
            count, kind, up = RUN_SEQUENCE.unpack_from(reply, RUN_REPLY.size + i * RUN_SEQUENCE.size)
            counts.append(count)
            kinds.append(SERVED_BY_NAMES.get(kind, ""))
            promoted.append(bool(up))
        assert self._views is not None
        tensors = dict(zip(("ids", "packed") if self.past else ("ids", "output", "lse"), self._views, strict=True))
        return RetrieveResult(counts=counts, index_kinds=kinds, server_ms=server, promoted=promoted, search_ms=search,
                              attend_ms=attend, search_kernel_ms=search_kernel, attend_kernel_ms=attend_kernel,
                              **tensors)

    def _retrieve(self, layer: int, ranges: Sequence[tuple[int, int]] | None) -> RetrieveResult:
        """The run as an ordinary Retrieve (no fast lane)."""
        sids: str | list[str] = self.session_ids[0] if self.single else self.session_ids
        past: dict[str, Any] = {}
        if self.past:
            past = {"past_in_queries": self.past, "packed": True, "past_seen_ids": self.seen_ids,
                    "past_seen_from": self.seen_from}
        return self.client.retrieve(sids, layer, self.queries, k=self.k, mode="attention", ranges=ranges,
                                    scale=self.scale, exact=self.exact, search_params=self.search_params or None,
                                    **past)

    # -- end -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the plan on the daemon and its shared memory (the queries view then stops being valid)."""
        if self.closed:
            return
        self.closed = True
        if self._started is not None:  # never finished: its reply is read by the connection's next call
            WATCH.forget(id(self))
            self._started = None
        with self.client._lock:
            lane = self.client._fast
            if lane is not None and lane is self._lane and not lane.broken:
                try:
                    lane.call_raw(RELEASE, RELEASE_BODY.pack(self._plan_id), "ReleasePrepared")
                except KvdError:
                    if lane.broken:
                        self.client._drop_lane()
            self._lane = None
            self._views = None
            self._release_region()
        self.client._plans.discard(self)

    def _release_region(self) -> None:
        if self._region is not None:
            region, self._region = self._region, None
            self.client._release(region)

    def __enter__(self) -> PreparedRetrieve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
