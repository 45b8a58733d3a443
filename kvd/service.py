"""gRPC servicer for kvd.v1.Kvd: decodes requests, runs the engine in worker threads, encodes replies."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from kvd import __version__, convert, retro
from kvd.engine import Engine
from kvd.errors import InvalidArgument, KvdError
from kvd.index.base import AttendSlots
from kvd.retrieval import Mode, fill_slots
from kvd.shm import OutputWriter
from kvd.v1 import kvd_pb2 as pb
from kvd.v1 import kvd_pb2_grpc as pb_grpc
from kvd.validate import MAX_K

log = logging.getLogger("kvd.service")
MODES = {pb.RETRIEVE_MODE_UNSPECIFIED: Mode.ATTENTION, pb.IDS: Mode.IDS, pb.IDS_KV: Mode.IDS_KV,
         pb.ATTENTION: Mode.ATTENTION}
Observer = Callable[[str, grpc.StatusCode, float, dict[str, str]], None]


def _rpc(method: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Run a handler body in the worker pool (KvdServicer.invoke) and map KvdError to its status code."""

    @functools.wraps(method)
    async def handler(self: KvdServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()  # the call's latency includes its wait for a worker
        tenant = self.tenant_of(context)
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, self.invoke, method, request, tenant, started)
        except KvdError as exc:
            await context.abort(exc.code, exc.message)

    return handler


class KvdServicer(pb_grpc.KvdServicer):
    def __init__(self, engine: Engine, pool: ThreadPoolExecutor, tenant_of: Callable[[Any], str],
                 observe: Observer | None = None) -> None:
        self.engine = engine
        self.pool = pool
        self.tenant_of = tenant_of
        self.observe = observe
        self.fast_lane_socket = ""  # set by the daemon when its fast lane listens (kvd.fastlane)

    def invoke(self, body: Callable[..., Any], request: Any, tenant: str, started: float | None = None,
               name: str = "") -> Any:
        """Run one call's body on this thread with the daemon's accounting (error counters, telemetry, under
        `name`, default the body's). Raises KvdError, an unexpected exception becoming INTERNAL (logged)."""
        started = time.perf_counter() if started is None else started
        name = name or body.__name__
        labels: dict[str, str] = {}
        code = grpc.StatusCode.OK
        try:
            return body(self, request, tenant, labels)
        except KvdError as exc:
            code = exc.code
            self.engine.counters[f"errors_{code.name.lower()}"] += 1
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            self.engine.counters["errors_internal"] += 1
            log.exception("internal error in %s", name)
            raise KvdError(f"internal error in {name}; see the daemon log") from None
        finally:
            if self.observe is not None:
                self.observe(name, code, time.perf_counter() - started, labels)

    def invoke_named(self, method: str, request: Any, tenant: str) -> Any:
        """invoke() by method name, for transports other than gRPC (kvd.fastlane)."""
        return self.invoke(getattr(type(self), method).__wrapped__, request, tenant)

    def codec(self, tenant: str) -> convert.TensorCodec:
        return convert.TensorCodec(self.engine.shm, tenant)

    # -- sessions --------------------------------------------------------------------------------------

    @_rpc
    def CreateSession(self, request: pb.CreateSessionRequest, tenant: str, labels: dict) -> pb.CreateSessionResponse:
        if not request.HasField("shape"):
            raise InvalidArgument("CreateSession needs a model shape")
        session, created = self.engine.create_session(
            tenant, request.session_id, convert.shape_from_wire(request.shape),
            convert.options_from_wire(request.options), request.exist_ok)
        return pb.CreateSessionResponse(session=convert.session_info(session), created=created)

    @_rpc
    def GetSession(self, request: pb.GetSessionRequest, tenant: str, labels: dict) -> pb.SessionInfo:
        return convert.session_info(self.engine.session(tenant, request.session_id))

    @_rpc
    def ListSessions(self, request: pb.ListSessionsRequest, tenant: str, labels: dict) -> pb.ListSessionsResponse:
        sessions = self.engine.list_sessions(tenant, request.prefix)
        if request.page_token:
            sessions = [s for s in sessions if s.session_id > request.page_token]
        next_token = ""
        if request.limit and len(sessions) > request.limit:
            sessions = sessions[: request.limit]
            next_token = sessions[-1].session_id
        return pb.ListSessionsResponse(sessions=[convert.session_info(s) for s in sessions],
                                       next_page_token=next_token)

    @_rpc
    def DeleteSession(self, request: pb.DeleteSessionRequest, tenant: str, labels: dict) -> pb.DeleteSessionResponse:
        memory, disk = self.engine.delete_session(tenant, request.session_id)
        return pb.DeleteSessionResponse(deleted=True, freed_memory_bytes=memory, freed_disk_bytes=disk)

    @_rpc
    def Stats(self, request: pb.StatsRequest, tenant: str, labels: dict) -> pb.StatsResponse:
        engine = self.engine
        in_memory, on_disk = engine.registry.counts()
        return pb.StatsResponse(
            version=__version__, uptime_seconds=time.time() - engine.started, sessions=in_memory + on_disk,
            sessions_in_memory=in_memory, sessions_on_disk=on_disk, memory_bytes=engine.registry.memory_bytes(),
            memory_budget_bytes=engine.registry.memory_budget_bytes, disk_bytes=engine.tiering.disk_bytes(),
            disk_budget_bytes=engine.config.storage.disk_budget, shared_memory_regions=engine.shm.count(),
            counters=engine.counter_values(),
            index_build_queue=engine.indexes.queue_length(),
        )

    # -- data path -------------------------------------------------------------------------------------

    @_rpc
    def Append(self, request: pb.AppendRequest, tenant: str, labels: dict) -> pb.AppendResponse:
        labels["transport"] = "shm" if request.keys.WhichOneof("data") == "shm" else "inline"
        labels["bytes"] = str(2 * (request.keys.shm.byte_size or len(request.keys.inline)))
        return self._append(request, tenant)

    def _append(self, request: pb.AppendRequest, tenant: str) -> pb.AppendResponse:
        codec = self.codec(tenant)
        keys = codec.read(request.keys, "keys")
        values = codec.read(request.values, "values")
        token_ids = torch.tensor(list(request.token_ids), dtype=torch.int64) if request.token_ids else None
        hint_queries = codec.read(request.hints.queries, "hints.queries", required=False)
        hint_topn = codec.read(request.hints.topn_ids, "hints.topn_ids", required=False)
        session = self.engine.append(tenant, request.session_id, request.start, list(request.layers), keys, values,
                                     token_ids, hint_queries, hint_topn)
        return pb.AppendResponse(num_tokens=session.num_tokens, layer_tokens=session.layer_tokens)

    async def AppendStream(self, request_iterator: AsyncIterator[pb.AppendRequest],
                           context: grpc.aio.ServicerContext) -> pb.AppendResponse:
        tenant = self.tenant_of(context)
        loop = asyncio.get_running_loop()
        reply = pb.AppendResponse()
        try:
            async for request in request_iterator:
                reply = await loop.run_in_executor(self.pool, self._append, request, tenant)
        except KvdError as exc:
            self.engine.counters[f"errors_{exc.code.name.lower()}"] += 1
            await context.abort(exc.code, exc.message)
        return reply

    @_rpc
    def Retrieve(self, request: pb.RetrieveRequest, tenant: str, labels: dict) -> pb.RetrieveResponse:
        started = time.perf_counter()
        codec = self.codec(tenant)
        queries = codec.read(request.queries, "queries")
        if request.mode not in MODES:
            raise InvalidArgument(f"unknown retrieve mode {request.mode}")
        mode = MODES[request.mode]
        labels["mode"] = mode.value
        ranges = [(r.begin, r.end) for r in request.ranges] if request.ranges else None
        writer = codec.writer(request.output, request.HasField("output"))
        past = None
        if request.HasField("past"):
            queries, past = retro.past_from_wire(codec, request.past, queries)
        candidates = codec.read(request.candidates, "candidates") if request.HasField("candidates") else None
        reply = pb.RetrieveResponse()
        into = attend_slots(writer, reply, queries, len(request.session_ids), request.k) \
            if mode is Mode.ATTENTION and past is None else None
        results, _sessions, promoted = self.engine.retrieve(
            tenant, list(request.session_ids), request.layer, queries, request.k, mode, ranges, request.scale,
            request.exact, dict(request.search_params), past=past, candidates=candidates, into=into)
        labels["index"] = results[0].index_kind if results else "flat"
        labels["sequences"] = str(len(results))
        reply.counts.extend([r.count for r in results])
        reply.index_kinds.extend([convert.SERVED_BY_WIRE.get(r.index_kind, pb.FLAT) for r in results])
        reply.promoted.extend(promoted)
        if into is not None:  # the reply's slots are reserved: results not written there in place are copied
            fill_slots(into, results)
        else:
            codec.write_sequences(writer, [r.ids for r in results], reply.ids)
        if mode is Mode.IDS_KV:
            codec.write_sequences(writer, [r.keys for r in results], reply.keys)
            codec.write_sequences(writer, [r.values for r in results], reply.values)
        elif mode is Mode.ATTENTION and past is not None and past.packed:
            retro.write_packed(codec, writer, results, reply)
        elif mode is Mode.ATTENTION and into is None:
            codec.write_sequences(writer, [r.output for r in results], reply.output)
            codec.write_sequences(writer, [r.lse for r in results], reply.lse)
            if past is not None:
                retro.write_past(codec, writer, results, reply)
        reply.search_ms = 1000 * sum(r.search_s for r in results)
        reply.attend_ms = 1000 * sum(r.attend_s for r in results)
        reply.search_kernel_ms = 1000 * sum(r.search_kernel_s for r in results)
        reply.attend_kernel_ms = 1000 * sum(r.attend_kernel_s for r in results)
        reply.server_ms = (time.perf_counter() - started) * 1000
        return reply

    @_rpc
    def Fetch(self, request: pb.FetchRequest, tenant: str, labels: dict) -> pb.FetchResponse:
        codec = self.codec(tenant)
        writer = codec.writer(request.output, request.HasField("output"))
        result = self.engine.fetch(tenant, request.session_id, list(request.layers), request.begin, request.end,
                                   request.with_token_ids)
        reply = pb.FetchResponse(begin=result.begin, end=result.end)
        codec.write(writer, result.keys, reply.keys)
        codec.write(writer, result.values, reply.values)
        if result.token_ids is not None:
            reply.token_ids.extend(result.token_ids.tolist())
        return reply

    @_rpc
    def Persist(self, request: pb.PersistRequest, tenant: str, labels: dict) -> pb.PersistResponse:
        session = self.engine.persist(tenant, request.session_id, request.seal)
        return pb.PersistResponse(durable_tokens=session.durable_tokens, state=convert.STATE_WIRE[session.state])

    @_rpc
    def Truncate(self, request: pb.TruncateRequest, tenant: str, labels: dict) -> pb.TruncateResponse:
        session = self.engine.truncate(tenant, request.session_id, request.num_tokens)
        return pb.TruncateResponse(session=convert.session_info(session))

    @_rpc
    def LookupPrefix(self, request: pb.LookupPrefixRequest, tenant: str, labels: dict) -> pb.LookupPrefixResponse:
        session_id, matched = self.engine.lookup_prefix(tenant, torch.tensor(list(request.token_ids),
                                                                             dtype=torch.int64))
        return pb.LookupPrefixResponse(session_id=session_id, matched_tokens=matched)

    async def ExportSession(self, request: pb.ExportSessionRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[pb.ExportChunk]:
        tenant = self.tenant_of(context)
        loop = asyncio.get_running_loop()
        try:
            chunks = await loop.run_in_executor(self.pool, self.engine.tiering.export_chunks, tenant,
                                                request.session_id)
        except KvdError as exc:
            await context.abort(exc.code, exc.message)
        for chunk in chunks:
            yield pb.ExportChunk(data=chunk)

    async def ImportSession(self, request_iterator: AsyncIterator[pb.ExportChunk],
                            context: grpc.aio.ServicerContext) -> pb.ImportSessionResponse:
        tenant = self.tenant_of(context)
        data = bytearray()
        async for chunk in request_iterator:
            data += chunk.data
        loop = asyncio.get_running_loop()
        try:
            session = await loop.run_in_executor(self.pool, self.engine.tiering.import_bytes, tenant, bytes(data))
        except KvdError as exc:
            await context.abort(exc.code, exc.message)
        return pb.ImportSessionResponse(session=convert.session_info(session))

    # -- shared memory ---------------------------------------------------------------------------------

    @_rpc
    def RegisterSharedMemory(self, request: pb.RegisterSharedMemoryRequest, tenant: str, labels: dict
                             ) -> pb.RegisterSharedMemoryResponse:
        self.engine.shm.register(tenant, request.name, request.key, request.offset, request.byte_size)
        return pb.RegisterSharedMemoryResponse(fast_lane_socket=self.fast_lane_socket)

    @_rpc
    def UnregisterSharedMemory(self, request: pb.UnregisterSharedMemoryRequest, tenant: str, labels: dict
                               ) -> pb.UnregisterSharedMemoryResponse:
        return pb.UnregisterSharedMemoryResponse(unregistered=self.engine.shm.unregister(tenant, request.name))

    @_rpc
    def SharedMemoryStatus(self, request: pb.SharedMemoryStatusRequest, tenant: str, labels: dict
                           ) -> pb.SharedMemoryStatusResponse:
        regions = self.engine.shm.status(tenant, request.name)
        return pb.SharedMemoryStatusResponse(regions=[
            pb.SharedMemoryRegionStatus(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
            for r in regions
        ])


def attend_slots(writer: OutputWriter | None, reply: pb.RetrieveResponse, queries: torch.Tensor, sequences: int,
                  k: int) -> list[AttendSlots] | None:
    """A mode ATTENTION reply's ids, output and lse reserved in the request's shared memory, one slot per sequence
    (a fused search writes there in place); None without shared memory or for a request the engine will refuse."""
    if writer is None or queries.dim() != 3 or queries.shape[0] != sequences or not 1 <= k <= MAX_K:
        return None
    n, heads, head_dim = queries.shape
    ids = writer.reserve((n, heads, k), torch.int64, reply.ids)
    output = writer.reserve((n, heads, head_dim), torch.float32, reply.output)
    lse = writer.reserve((n, heads), torch.float32, reply.lse)
    return [AttendSlots(ids[i], output[i], lse[i]) for i in range(n)]
