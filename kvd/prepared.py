"""Prepared Retrieves on the fast lane: a decode step's per-layer call without protobuf or per-call validation.

A client sends a RetrieveRequest once as a plan's template; the daemon checks it (Engine.prepare_retrieve),
reserves the result slots in the client's shared memory and keeps views of both the query slot and the result
slots. Each run is then a frame of a few bytes (plan id, layer, ranges) answered by a few bytes (counts,
timings): no message to parse or build, no shared-memory lookups, no validation of what cannot have changed.
The wire format is in kvd_client.fastlane; plans belong to one connection (ConnectionPlans) and end with it.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict

import numpy as np
import torch
from kvd_client.fastlane import RANGE, RELEASE_BODY, RUN_HEADER, RUN_REPLY, RUN_SEQUENCE, SIGNAL

from kvd import convert, retro
from kvd.engine import Engine, PreparedRetrieve
from kvd.errors import FailedPrecondition, InvalidArgument, NotFound
from kvd.index.base import AttendSlots, packed_slots
from kvd.retrieval import Mode, fill_slots
from kvd.service import MODES, attend_slots
from kvd.shm import OutputWriter, Registration
from kvd.v1 import kvd_pb2 as pb
from kvd.validate import MAX_K

MAX_PLANS = 64  # per connection (a decode loop needs one per batch of sessions); beyond, the least recently used goes


class Plan:
    """A prepared Retrieve with the shared-memory registration its views belong to (its result slots,
    `spec.into`, are views there: with past queries, packed blocks)."""

    def __init__(self, prepared: PreparedRetrieve, registration: Registration,
                 spans: list[tuple[int, int]] | None = None) -> None:
        self.prepared = prepared
        self.registration = registration
        self.sequences = len(prepared.session_ids)
        self.spans = spans or []  # the byte ranges [begin, end) of the plan's tensors in its region
        self._signal: tuple[int, np.ndarray] | None = None  # the last RUN_SIGNALLED's offset and a view of its word

    def signal_word(self, offset: int) -> np.ndarray:
        """The uint32 word at byte `offset` of the plan's region, checked: 4-aligned, inside the region and outside
        the plan's tensors (a signal there would overwrite a query or a result)."""
        if self._signal is not None and self._signal[0] == offset:
            return self._signal[1]
        if offset % 4 or offset + 4 > self.registration.byte_size:
            raise InvalidArgument(f"a run's signal word must be 4-aligned and inside the plan's region of "
                                  f"{self.registration.byte_size} bytes, not at byte {offset}")
        if any(begin < offset + 4 and offset < end for begin, end in self.spans):
            raise InvalidArgument(f"a run's signal word at byte {offset} overlaps the plan's tensors")
        start = self.registration.offset + offset
        # a single aligned 4-byte store: a stream waiting on the word never sees half of it
        word = np.frombuffer(self.registration.region.buffer[start: start + 4], dtype=np.uint32)
        self._signal = (offset, word)
        return word


class ConnectionPlans:
    """The prepared Retrieves of one fast-lane connection (used by that connection's thread only)."""

    def __init__(self, engine: Engine, limit: int = MAX_PLANS) -> None:
        self.engine = engine
        self.limit = limit
        self.plans: OrderedDict[int, Plan] = OrderedDict()  # least recently run first
        self.next_id = 1

    def prepare(self, request: pb.RetrieveRequest, tenant: str, labels: dict) -> pb.PrepareRetrieveResponse:
        if request.HasField("candidates"):
            raise InvalidArgument("a prepared Retrieve cannot have candidates")
        if request.ranges or request.layer:
            raise InvalidArgument("a prepared Retrieve's layer and ranges are given with each run, not in its template")
        if MODES.get(request.mode) is not Mode.ATTENTION:
            raise InvalidArgument("a prepared Retrieve is mode ATTENTION")
        inputs = [request.queries]
        if request.HasField("past"):
            past_message = request.past
            if not past_message.stacked or not past_message.packed:
                raise InvalidArgument("a prepared Retrieve's past queries are stacked in its queries and packed")
            inputs += [getattr(past_message, name) for name in ("seen_ids", "seen_from")
                       if past_message.HasField(name)]
        if any(t.WhichOneof("data") != "shm" for t in inputs) or not request.HasField("output"):
            raise InvalidArgument("a prepared Retrieve's queries, seen ids and output must be in shared memory")
        output_ref = request.output
        if any(t.shm.region == output_ref.region and _overlap(t.shm, output_ref) for t in inputs):
            raise InvalidArgument("a prepared Retrieve's inputs and output must not overlap")
        codec = convert.TensorCodec(self.engine.shm, tenant)
        queries = codec.read(request.queries, "queries")
        stacked, past = queries, None
        if request.HasField("past"):
            queries, past = retro.past_from_wire(codec, request.past, queries)
        writer = codec.writer(output_ref, True)
        reply = pb.PrepareRetrieveResponse()
        sessions = len(request.session_ids)
        if past is not None:
            into = self._past_slots(writer, reply, queries, sessions, request.k, past)
        elif (into := attend_slots(writer, reply, queries, sessions, request.k)) is None:
            raise InvalidArgument(f"queries must be [{sessions}, num_query_heads, head_dim] and 1 <= k")
        prepared = self.engine.prepare_retrieve(tenant, list(request.session_ids), queries, request.k, request.scale,
                                                request.exact, dict(request.search_params), into, past, stacked)
        registration = self.engine.shm.registration(tenant, output_ref.region)
        if registration is None or any(self.engine.shm.registration(tenant, t.shm.region) is not registration
                                       for t in inputs):
            raise InvalidArgument("a prepared Retrieve's tensors must all be in one shared-memory region")
        reply.plan_id = self.next_id
        if len(self.plans) >= self.limit:  # a client that dropped its plans without releasing them
            self.plans.popitem(last=False)
        spans = [(t.shm.offset, t.shm.offset + t.shm.byte_size) for t in inputs]
        spans.append((output_ref.offset, output_ref.offset + output_ref.byte_size))
        self.plans[self.next_id] = Plan(prepared, registration, spans)
        self.next_id += 1
        return reply

    @staticmethod
    def _past_slots(writer: OutputWriter, reply: pb.PrepareRetrieveResponse, queries: torch.Tensor, sequences: int,
                    k: int, past: retro.PastQueries) -> list[AttendSlots]:
        """The reply slots of a plan with past queries, per sequence (`packed_slots`): views of ids [n, Hq, k] and
        packed [n, P + 1, Hq, d + 1]."""
        if queries.dim() != 3 or queries.shape[0] != sequences or not 1 <= k <= MAX_K:
            raise InvalidArgument(f"queries must be [{sequences}, P + 1, num_query_heads, head_dim] and "
                                  f"1 <= k <= {MAX_K}")
        n, heads, dim = queries.shape
        ids = writer.reserve((n, heads, k), torch.int64, reply.ids)
        packed = writer.reserve((n, past.queries.shape[1] + 1, heads, dim + 1), torch.float32, reply.packed)
        return [packed_slots(ids[i], packed[i]) for i in range(n)]

    def run(self, payload: bytes, tenant: str, labels: dict) -> bytes:
        started = time.perf_counter()
        if len(payload) < RUN_HEADER.size:
            raise InvalidArgument(f"a prepared-Retrieve run needs at least {RUN_HEADER.size} bytes")
        plan_id, layer, count = RUN_HEADER.unpack_from(payload)
        plan = self._plan(plan_id, tenant)
        if len(payload) != RUN_HEADER.size + count * RANGE.size:
            raise InvalidArgument(f"a run with {count} ranges has {RUN_HEADER.size + count * RANGE.size} bytes, "
                                  f"not {len(payload)}")
        if count not in (0, plan.sequences):
            raise InvalidArgument(f"{count} ranges given for {plan.sequences} sequences")
        ranges = None
        if count:
            flat = struct.unpack_from(f"<{2 * count}q", payload, RUN_HEADER.size)
            ranges = list(zip(flat[0::2], flat[1::2], strict=True))
            if min(flat) < 0:
                raise InvalidArgument("range bounds must not be negative")
        if not self.engine.shm.holds(tenant, plan.registration):
            del self.plans[plan_id]
            raise FailedPrecondition("the shared-memory region of this prepared Retrieve was unregistered; prepare "
                                     "it again")
        results, promoted = self.engine.retrieve_prepared(plan.prepared, layer, ranges)
        assert plan.prepared.spec.into is not None
        fill_slots(plan.prepared.spec.into, results)
        labels["mode"] = Mode.ATTENTION.value
        labels["index"] = results[0].index_kind
        labels["sequences"] = str(len(results))
        head = RUN_REPLY.pack(
            (time.perf_counter() - started) * 1000, 1000 * sum(r.search_s for r in results),
            1000 * sum(r.attend_s for r in results), 1000 * sum(r.search_kernel_s for r in results),
            1000 * sum(r.attend_kernel_s for r in results))
        return head + b"".join(RUN_SEQUENCE.pack(r.count, convert.SERVED_BY_WIRE.get(r.index_kind, pb.FLAT), p)
                               for r, p in zip(results, promoted, strict=True))

    def run_signalled(self, payload: bytes, tenant: str, labels: dict) -> bytes:
        """A run that then stores its signal value in the plan's region, whether it succeeded or failed (a device
        stream may be waiting on that word), before the reply is sent."""
        if len(payload) < SIGNAL.size + RUN_HEADER.size:
            raise InvalidArgument(f"a signalled run needs at least {SIGNAL.size + RUN_HEADER.size} bytes")
        offset, value = SIGNAL.unpack_from(payload)
        plan_id = RUN_HEADER.unpack_from(payload, SIGNAL.size)[0]
        word = self._plan(plan_id, tenant).signal_word(offset)
        try:
            return self.run(payload[SIGNAL.size:], tenant, labels)
        finally:
            word[0] = value

    def release(self, payload: bytes, tenant: str, labels: dict) -> bytes:
        if len(payload) != RELEASE_BODY.size:
            raise InvalidArgument(f"a release names one plan id ({RELEASE_BODY.size} bytes)")
        (plan_id,) = RELEASE_BODY.unpack(payload)
        self._plan(plan_id, tenant)
        del self.plans[plan_id]
        return b""

    def _plan(self, plan_id: int, tenant: str) -> Plan:
        plan = self.plans.get(plan_id)
        if plan is None or plan.prepared.tenant != tenant:
            raise NotFound(f"no prepared Retrieve {plan_id} on this connection")
        self.plans.move_to_end(plan_id)
        return plan


def _overlap(a: pb.SharedMemoryRef, b: pb.SharedMemoryRef) -> bool:
    return a.offset < b.offset + b.byte_size and b.offset < a.offset + a.byte_size
