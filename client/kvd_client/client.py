"""Synchronous kvd client."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvd.v1 import kvd_pb2 as pb
from kvd.v1 import kvd_pb2_grpc as pb_grpc
from kvd_client import calls, fastlane
from kvd_client import target as targets
from kvd_client.errors import KvdError, NotFoundError, from_rpc_error
from kvd_client.fastlane import FastLane
from kvd_client.prepared import PreparedRetrieve
from kvd_client.transport import Placer, Transport
from kvd_client.types import FetchResult, RetrieveResult, SessionInfo, Stats

T = TypeVar("T")
APPEND_CHUNK_BYTES = 256 << 20


class KvdClient:
    """Talks to a kvd daemon.

    target: "unix:///path/kvd.sock", "/path/kvd.sock", "host:port", or None for $KVD_TARGET or the default
            socket. shm: "auto" (shared memory when the daemon is on this host, inline bytes otherwise),
            True (require it) or False. token: bearer token for a daemon that requires one.
    fast_lane: send Retrieve/Append/Fetch over the daemon's fast-lane socket when it offers one (local clients
            using shared memory; kvd_client.fastlane), else gRPC. Same messages, results and errors.
    """

    def __init__(self, target: str | None = None, *, shm: bool | str = "auto", token: str | None = None,
                 tls_root_cert: bytes | None = None, timeout: float | None = None,
                 max_shm_bytes: int = 1 << 30, fast_lane: bool = True) -> None:
        self._settings = {"shm": shm, "token": token, "tls_root_cert": tls_root_cert, "timeout": timeout,
                          "max_shm_bytes": max_shm_bytes, "fast_lane": fast_lane}
        self.target = targets.normalize(target)
        options = targets.channel_options()
        if tls_root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root_cert)
            self._channel = grpc.secure_channel(self.target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = pb_grpc.KvdStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        use_shm = shm if shm != "auto" else ("auto" if targets.is_local(self.target) else False)
        self._transport = Transport(use_shm, max_shm_bytes)
        self._lock = threading.RLock()
        self._shapes: dict[str, SessionInfo] = {}
        self._token = token
        self._fast_lane_wanted = fast_lane
        self._fast_path = ""              # the daemon's fast-lane socket, learned when shm is registered
        self._fast: FastLane | None = None
        self._plans: weakref.WeakSet[PreparedRetrieve] = weakref.WeakSet()

    def sibling(self) -> KvdClient:
        """Another client of the same daemon with the same settings, with its own connection and shared memory:
        calls on a client are serialized, so work that must overlap (e.g. lookahead searches beside a decode
        step's Retrieve) uses a sibling."""
        return KvdClient(self.target, **self._settings)

    # -- plumbing --------------------------------------------------------------------------------------

    def _invoke(self, method: str, request: Any) -> Any:
        lane = self._lane() if method in fastlane.METHODS else None
        if lane is not None:
            try:
                return lane.call(method, request)
            except KvdError:
                if not lane.broken:
                    raise
                self._drop_lane()
                if method not in fastlane.READ_ONLY:
                    raise  # it may have been applied before the connection broke: no blind retry
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def _lane(self) -> FastLane | None:
        """The fast-lane connection (callers hold the lock), opened on first use; None: use gRPC."""
        if self._fast is None and self._fast_path:
            try:
                self._fast = FastLane(self._fast_path, self._token, self.timeout)
            except (OSError, KvdError):
                self._fast_path = ""  # refused or gone: stay on gRPC until the daemon offers it again
        return self._fast

    def _drop_lane(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None

    @property
    def uses_fast_lane(self) -> bool:
        return self._fast is not None

    def _placer(self, needed: int) -> Placer:
        """Grow (or create) the shared-memory region so that `needed` bytes fit; falls back to inline."""
        region = self._transport.wanted_region(needed)
        if region is not None:
            try:
                self._register(region)
            except KvdError:
                region.close()
                if self._transport.mode is True:
                    raise
                self._transport.disable()
            else:
                previous = self._transport.adopt(region)
                if previous is not None:
                    self._release(previous)
        return self._transport.placer(needed)

    def _register(self, region: Any) -> None:
        reply = self._invoke("RegisterSharedMemory", pb.RegisterSharedMemoryRequest(
            name=region.key, key=region.key, offset=0, byte_size=region.size))
        if self._fast_lane_wanted and reply.fast_lane_socket != self._fast_path:
            self._drop_lane()
            self._fast_path = reply.fast_lane_socket

    def _release(self, region: Any) -> None:
        with contextlib.suppress(KvdError):
            self._invoke("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=region.key))
        region.close()

    def _with_tensors(self, needed: int, call: Callable[[Placer], T]) -> T:
        with self._lock:
            placer = self._placer(needed)
            try:
                return call(placer)
            except NotFoundError as exc:
                # A restarted daemon has forgotten the region: the call was refused before doing anything,
                # so register it again and repeat the call once.
                if placer.name is None or f"region {placer.name!r} is not registered" not in exc.details:
                    raise
                self._register(self._transport.region)
                return call(self._placer(needed))

    @property
    def uses_shared_memory(self) -> bool:
        return self._transport.region is not None

    def close(self) -> None:
        for plan in list(self._plans):
            plan.close()
        with self._lock:
            region = self._transport.close()
            if region is not None:
                self._release(region)
            self._drop_lane()
            self._channel.close()

    def __enter__(self) -> KvdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions --------------------------------------------------------------------------------------

    def create_session(self, session_id: str = "", *, num_layers: int, num_kv_heads: int, head_dim: int,
                       num_query_heads: int | None = None, dtype: torch.dtype | str = torch.float16,
                       index: str | None = None, sink_tokens: int = 0, window_tokens: int = 0,
                       exist_ok: bool = False, pinned: bool = False, ttl_seconds: int = 0,
                       index_params: dict[str, Any] | None = None, labels: dict[str, str] | None = None
                       ) -> SessionInfo:
        request = calls.create_request(session_id, num_layers=num_layers, num_kv_heads=num_kv_heads,
                                       num_query_heads=num_query_heads, head_dim=head_dim, dtype=dtype, index=index,
                                       sink_tokens=sink_tokens, window_tokens=window_tokens, exist_ok=exist_ok,
                                       pinned=pinned, ttl_seconds=ttl_seconds, index_params=index_params,
                                       labels=labels)
        info = SessionInfo.from_wire(self._invoke("CreateSession", request).session)
        self._shapes[info.session_id] = info
        return info

    def get_session(self, session_id: str) -> SessionInfo:
        info = SessionInfo.from_wire(self._invoke("GetSession", pb.GetSessionRequest(session_id=session_id)))
        self._shapes[session_id] = info
        return info

    def list_sessions(self, prefix: str = "") -> list[SessionInfo]:
        found: list[SessionInfo] = []
        token = ""
        while True:
            reply = self._invoke("ListSessions", pb.ListSessionsRequest(prefix=prefix, limit=1000, page_token=token))
            found.extend(SessionInfo.from_wire(s) for s in reply.sessions)
            token = reply.next_page_token
            if not token:
                return found

    def delete_session(self, session_id: str) -> pb.DeleteSessionResponse:
        self._shapes.pop(session_id, None)
        return self._invoke("DeleteSession", pb.DeleteSessionRequest(session_id=session_id))

    def stats(self) -> Stats:
        return Stats.from_wire(self._invoke("Stats", pb.StatsRequest()))

    def health(self, service: str = "") -> str:
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 5)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _shape(self, session_id: str) -> SessionInfo:
        return self._shapes.get(session_id) or self.get_session(session_id)

    # -- data path -------------------------------------------------------------------------------------

    def append(self, session_id: str, start: int, keys: Any, values: Any, *, layers: Sequence[int] | None = None,
               token_ids: Any = None, hint_queries: Any = None, hint_topn: Any = None) -> pb.AppendResponse:
        """Store K/V of tokens [start, start + n) for some layers.

        keys, values: [n_layers, num_kv_heads, n, head_dim] (or [num_kv_heads, n, head_dim] with one layer in
        `layers`), torch or numpy, in the session dtype. layers: which layers (default: all, in order).
        token_ids: the n token ids (for prefix reuse). hint_queries [n_layers, num_query_heads, s, head_dim] and
        hint_topn [n_layers, num_query_heads, s, N]: prefill-query sample and its exact top-N key positions,
        which let the daemon build attention-aware indexes cheaply. Large appends are split automatically.
        """
        keys, values = calls.normalize_kv(keys, values, layers)
        token_tensor = None if token_ids is None else torch.as_tensor(token_ids).reshape(-1)
        reply = pb.AppendResponse()
        chunks = calls.append_chunks(keys, APPEND_CHUNK_BYTES)
        for i, (a, b) in enumerate(chunks):
            last = i == len(chunks) - 1
            part_k, part_v = keys[:, :, a:b], values[:, :, a:b]
            part_ids = None if token_tensor is None else token_tensor[a:b]
            hq, ht = (hint_queries, hint_topn) if last else (None, None)
            needed = calls.nbytes(part_k) * 2 + calls.nbytes(hq) + calls.nbytes(ht) + 1024
            reply = self._with_tensors(needed, lambda placer, a=a, part_k=part_k, part_v=part_v, part_ids=part_ids,
                                       hq=hq, ht=ht: self._invoke("Append", calls.append_request(
                                           placer, session_id, start + a, part_k, part_v, layers, part_ids, hq, ht)))
        return reply

    def retrieve(self, session_ids: str | Sequence[str], layer: int, queries: Any, *, k: int,
                 mode: str = "attention", ranges: Sequence[tuple[int, int]] | None = None,
                 scale: float | None = None, exact: bool = False, search_params: dict[str, Any] | None = None,
                 past_queries: Any = None, past_seen_ids: Any = None, past_seen_from: Any = None,
                 packed: bool = False, past_in_queries: int = 0, candidates: Any = None
                 ) -> RetrieveResult:
        """Top-k keys per query head of one layer, for one session or a batch of sessions.

        queries: [n, num_query_heads, head_dim] for a list of n sessions, or [num_query_heads, head_dim] for one
        session id (then the result drops the batch axis). mode: "ids" (positions), "ids_kv" (positions plus
        gathered K/V) or "attention" (partial attention: float32 output and log-sum-exp, mergeable exactly with
        attention over other keys by kvd_client.merge_attention). ranges: per sequence (begin, end) token range
        to search (end 0 = the session's length); default: everything except the session's sink and window.
        scale: softmax scale (default 1/sqrt(head_dim)). exact: force the exact scan.

        RetroAttention (mode "attention"): past_queries [n, P, num_query_heads, head_dim] are earlier queries
        of the same layer; each also attends those of the keys retrieved now for its query head that are below
        past_seen_from [n, P] (it saw the rest through its window) and not in past_seen_ids [n, P, Hq, S]
        (-1 = none). result.past_output / past_lse hold that partial attention (lse -inf when nothing is new).
        With one session id the leading n axis is left out of these too. packed (with past queries): the reply
        holds result.packed, float32 [n, P + 1, Hq, head_dim + 1] (past rows, then the current query's; lse in
        the last column), instead of output, lse, past_output and past_lse: one tensor to decode and copy.
        past_in_queries P (instead of past_queries): queries is [n, P + 1, num_query_heads, head_dim] (or
        [P + 1, num_query_heads, head_dim] for one session id), the P past queries first, the current one last:
        one tensor to send.

        candidates: [n, num_query_heads, C] int positions (-1 = none) to take the top-k from by exact score
        instead of searching, e.g. what an earlier mode "ids" call with an approximate query found (lookahead);
        positions outside the range are left out, a repeated one counts once; result.index_kinds says
        "candidates".
        """
        stacked = int(past_in_queries)
        if packed and past_queries is None and not stacked:
            raise ValueError("packed needs past queries")
        ids, tensor, single = calls.normalize_queries(session_ids, queries, stacked)
        past = calls.normalize_past(single, past_queries, past_seen_ids, past_seen_from, stacked)
        cand = calls.normalize_candidates(single, candidates)
        info = self._shape(ids[0])
        if past is None:
            count = 0
        elif stacked:
            count = stacked
        else:
            assert past[0] is not None
            count = past[0].shape[1] if past[0].dim() > 1 else 1
        out = calls.retrieve_output_bytes(len(ids), tensor.shape[-2], k, tensor.shape[-1], mode,
                                          calls.element_size(info.dtype), count)
        needed = calls.nbytes(tensor) + out + (0 if past is None else sum(calls.nbytes(t) for t in past))
        needed += calls.nbytes(cand)
        return self._with_tensors(needed, lambda placer: calls.retrieve_result(
            self._invoke("Retrieve", calls.retrieve_request(placer, ids, layer, tensor, k, mode, ranges, scale, exact,
                                                            search_params, past, packed, stacked, cand)),
            placer,
            single))

    def prepare_retrieve(self, session_ids: str | Sequence[str], *, k: int, scale: float | None = None,
                         exact: bool = False, search_params: dict[str, Any] | None = None,
                         query_dtype: torch.dtype = torch.float32, past: int = 0, seen: int = 0
                         ) -> PreparedRetrieve:
        """A mode "attention" Retrieve of these sessions to run layer after layer with new queries: write them into
        plan.queries ([n, num_query_heads, head_dim], or [num_query_heads, head_dim] for one session id), then
        plan.run(layer, ranges). Over the fast lane a run costs a few bytes each way (kvd_client.prepared); the
        results are the same as retrieve()'s with these arguments. past=P, seen=S: RetroAttention's P past
        queries stacked before the current one, with S seen ids each (retrieve()'s past_in_queries, past_seen_ids,
        past_seen_from, packed=True). Close the plan when done."""
        return PreparedRetrieve(self, session_ids, k=k, scale=scale, exact=exact, search_params=search_params,
                                query_dtype=query_dtype, past=past, seen=seen)

    def fetch(self, session_id: str, begin: int = 0, end: int | None = None, *, layers: Sequence[int] | None = None,
              with_token_ids: bool = False) -> FetchResult:
        """K/V of tokens [begin, end) (default: to the end) for some layers (default all), to rehydrate a cache."""
        info = self.get_session(session_id) if end is None else self._shape(session_id)
        stop = end if end is not None else info.num_tokens
        n_layers = len(layers) if layers else info.num_layers
        out = calls.fetch_output_bytes(n_layers, info.num_kv_heads, max(0, stop - begin), info.head_dim,
                                       calls.element_size(info.dtype))
        return self._with_tensors(out, lambda placer: calls.fetch_result(
            self._invoke("Fetch", calls.fetch_request(placer, session_id, begin, stop, layers, with_token_ids)),
            placer, with_token_ids))

    def persist(self, session_id: str, *, seal: bool = False) -> int:
        """Make the session durable up to its current length; returns the durable token count."""
        return self._invoke("Persist", pb.PersistRequest(session_id=session_id, seal=seal)).durable_tokens

    def truncate(self, session_id: str, num_tokens: int) -> SessionInfo:
        reply = self._invoke("Truncate", pb.TruncateRequest(session_id=session_id, num_tokens=num_tokens))
        return SessionInfo.from_wire(reply.session)

    def lookup_prefix(self, token_ids: Any) -> tuple[str | None, int]:
        """The stored session sharing the longest prefix with `token_ids`, and that prefix's length."""
        ids = [int(t) for t in torch.as_tensor(token_ids).reshape(-1).tolist()]
        reply = self._invoke("LookupPrefix", pb.LookupPrefixRequest(token_ids=ids))
        return (reply.session_id or None), reply.matched_tokens

    def export_session(self, session_id: str) -> Iterator[bytes]:
        try:
            for chunk in self._stub.ExportSession(pb.ExportSessionRequest(session_id=session_id),
                                                  timeout=self.timeout, metadata=self._metadata):
                yield chunk.data
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def import_session(self, chunks: Iterator[bytes] | bytes) -> SessionInfo:
        if isinstance(chunks, bytes | bytearray):
            data = bytes(chunks)
            chunks = iter([data[i: i + (4 << 20)] for i in range(0, len(data), 4 << 20)] or [b""])
        try:
            reply = self._stub.ImportSession((pb.ExportChunk(data=c) for c in chunks), timeout=self.timeout,
                                             metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return SessionInfo.from_wire(reply.session)
