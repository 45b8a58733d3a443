"""The daemon's operations on plain Python values: sessions, append, retrieve, fetch, persist.

The gRPC servicer (kvd.service) decodes messages and calls these methods in worker threads; everything here
is thread-safe and raises kvd.errors.KvdError subclasses for bad input or state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from kvd import ingest_kernels, retro
from kvd.config import Config
from kvd.errors import FailedPrecondition, InvalidArgument, KvdError
from kvd.index.base import AttendSlots, IndexShape
from kvd.index.manager import IndexManager
from kvd.retrieval import Mode, RetrieveSpec, SequenceResult, SessionSpilled, default_scale, retrieve_batch
from kvd.shm import SharedMemoryRegistry
from kvd.store.registry import Registry
from kvd.store.session import ModelShape, Session, SessionOptions, State, Tier
from kvd.tiering import Tiering
from kvd.validate import (
    MAX_CANDIDATES,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_K,
    MAX_LAYERS,
    MAX_THREADS,
    QUERY_DTYPES,
    STORAGE_DTYPES,
    check_dtype,
    check_finite,
    check_range,
    check_scale,
    check_shape,
)

log = logging.getLogger("kvd.engine")
INDEX_KINDS = ("flat", "hnsw", "graph", "wave")
T = TypeVar("T")
_PARALLEL_APPEND_BYTES = 8 << 20


@dataclass
class PreparedRetrieve:
    """A validated mode ATTENTION Retrieve whose layer, ranges and query values change from run to run
    (Engine.prepare_retrieve / retrieve_prepared; kvd.prepared serves it on the fast lane)."""

    tenant: str
    session_ids: list[str]
    queries: torch.Tensor     # [n, Hq, d]: a view of the client's shared memory, rewritten before each run
    spec: RetrieveSpec        # its `into` slots: views of the client's shared memory too
    sessions: list[Session]   # as validated (a recreated session is checked again)
    count_nonfinite: Callable[[], int]  # NaN/Inf in the queries' current values
    past: retro.PastQueries | None = None  # RetroAttention's past queries and seen ids: views too, checked per run
    past_in_checked: bool = False  # count_nonfinite also covers the past queries (stacked in one slot)
    checked_past: retro.PastQueries | None = None  # `past` as checked, where a check cannot change between runs


@dataclass
class FetchResult:
    keys: torch.Tensor
    values: torch.Tensor
    token_ids: torch.Tensor | None
    begin: int
    end: int


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self.registry = Registry(config.memory_budget_bytes)
        self.shm = SharedMemoryRegistry()
        workers = config.server.workers or os.cpu_count() or 1
        self.fanout = ThreadPoolExecutor(max_workers=max(2, workers), thread_name_prefix="kvd-seq")
        self.scan_pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kvd-scan")
        self.counters: Counter[str] = Counter()
        self.indexes = IndexManager(config.index)
        self.tiering = Tiering(config, self.registry, self.indexes)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def start(self) -> list[str]:
        """Open the disk tier and recover durable sessions; returns messages about rolled-back data."""
        messages = self.tiering.open()
        self._reaper = threading.Thread(target=self._reap_loop, name="kvd-ttl", daemon=True)
        self._reaper.start()
        return messages

    def _reap_loop(self) -> None:
        while not self._stop.wait(1.0):
            self.expire_idle(time.time())
            for name in self.shm.release_abandoned():
                log.info("shared-memory region released: its client went away", extra={"fields": {"region": name}})

    def expire_idle(self, now: float) -> list[str]:
        """Delete unpinned sessions idle for longer than their TTL, from both tiers."""
        expired = []
        for session in self.registry.sessions():
            ttl = session.options.ttl_seconds
            if ttl and not session.options.pinned and now - session.last_access > ttl and not session.deleted:
                try:
                    self.delete_session(session.tenant, session.session_id)
                except KvdError:
                    continue
                expired.append(session.session_id)
                self.counters["expired"] += 1
                log.info("session expired", extra={"fields": {"session": session.session_id, "ttl": ttl}})
        return expired

    @contextlib.contextmanager
    def in_memory(self, session: Session, write: bool) -> Iterator[None]:
        """Hold the session's lock with its data in RAM (promoting it from disk as needed)."""
        while True:
            self.tiering.promote(session)
            lock = session.lock.write() if write else session.lock.read()
            with lock:
                if session.tier is Tier.MEMORY:
                    yield
                    return

    def counter_values(self) -> dict[str, float]:
        values = {k: float(v) for k, v in self.counters.items()}
        values.update(self.tiering.counters)
        return values

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        if self.config.storage.persist_on_shutdown:
            self.tiering.persist_all()
        self.tiering.close()
        self.indexes.close()
        self.shm.close()
        self.fanout.shutdown(wait=False, cancel_futures=True)
        self.scan_pool.shutdown(wait=False, cancel_futures=True)

    # -- sessions --------------------------------------------------------------------------------------

    def create_session(self, tenant: str, session_id: str, shape: ModelShape, options: SessionOptions,
                       exist_ok: bool) -> tuple[Session, bool]:
        check_range("num_layers", shape.num_layers, 1, MAX_LAYERS)
        check_range("num_kv_heads", shape.num_kv_heads, 1, MAX_HEADS)
        check_range("num_query_heads", shape.num_query_heads, 1, MAX_HEADS)
        check_range("head_dim", shape.head_dim, 1, MAX_HEAD_DIM)
        if shape.num_query_heads % shape.num_kv_heads:
            raise InvalidArgument(
                f"num_query_heads ({shape.num_query_heads}) must be a multiple of num_kv_heads "
                f"({shape.num_kv_heads})"
            )
        if shape.dtype not in STORAGE_DTYPES:
            raise InvalidArgument(f"dtype {shape.dtype} cannot store K/V; use float16, bfloat16 or float32")
        if options.index_kind and options.index_kind not in INDEX_KINDS:
            raise InvalidArgument(f"unknown index kind {options.index_kind!r}")
        options.index_kind = options.index_kind or self.config.index.default_kind
        self.indexes.check_params(options.index_kind, IndexShape(shape.num_kv_heads, shape.num_query_heads,
                                                                 shape.head_dim), options.index_params)
        if options.ttl_seconds == 0:
            options.ttl_seconds = self.config.storage.default_ttl_seconds
        if session_id:
            self.tiering.ensure_loaded(tenant, session_id)
        session, created = self.registry.create(tenant, session_id, shape, options, exist_ok)
        if created:
            self.tiering.on_create(session)
            self.counters["sessions_created"] += 1
            log.info("session created", extra={"fields": {"session": session.session_id, "tenant": tenant}})
        return session, created

    def session(self, tenant: str, session_id: str) -> Session:
        self.tiering.ensure_loaded(tenant, session_id)
        session = self.registry.get(tenant, session_id)
        session.touch()
        return session

    def list_sessions(self, tenant: str, prefix: str = "") -> list[Session]:
        return [s for s in self.registry.sessions(tenant) if s.session_id.startswith(prefix)]

    def delete_session(self, tenant: str, session_id: str) -> tuple[int, int]:
        session = self.session(tenant, session_id)
        with session.lock.write():
            memory = session.memory_bytes
            session.deleted = True
            self.registry.remove(session)
            self.indexes.drop(session)
            for layer in session.layers:
                layer.release()
            session.token_ids.load(torch.empty(0, dtype=torch.int64))
            disk = self.tiering.delete(session)
        self.counters["sessions_deleted"] += 1
        return memory, disk

    # -- data path -------------------------------------------------------------------------------------

    def append(self, tenant: str, session_id: str, start: int, layers: list[int], keys: torch.Tensor,
               values: torch.Tensor, token_ids: torch.Tensor | None, hint_queries: torch.Tensor | None,
               hint_topn: torch.Tensor | None) -> Session:
        session = self.session(tenant, session_id)
        shape = session.shape
        layers = layers or list(range(shape.num_layers))
        if len(set(layers)) != len(layers):
            raise InvalidArgument(f"append lists a layer twice: {layers}")
        for layer in layers:
            check_range("layer", layer, 0, shape.num_layers - 1)
        check_dtype("keys", keys, (shape.dtype,))
        check_dtype("values", values, (shape.dtype,))
        if keys.dim() != 4:
            raise InvalidArgument(f"keys must be [n_layers, num_kv_heads, n_tokens, head_dim], got {list(keys.shape)}")
        n_tokens = keys.shape[2]
        # a decode-time append (a few tokens) costs less than handing its layers to worker threads
        parallel = keys.numel() * keys.element_size() >= _PARALLEL_APPEND_BYTES
        expected = (len(layers), shape.num_kv_heads, n_tokens, shape.head_dim)
        check_shape("keys", keys, expected)
        check_shape("values", values, expected)
        for what, tensor in (("keys", keys), ("values", values)):
            bad = sum(self._per_layer(lambda i, t=tensor: ingest_kernels.count_nonfinite(t[i]), len(layers),
                                      parallel))
            if bad:
                raise InvalidArgument(f"{what} contains {bad} NaN or infinite values")
        if token_ids is not None and token_ids.numel() != n_tokens:
            raise InvalidArgument(f"{token_ids.numel()} token ids given for {n_tokens} tokens")
        hints = self.indexes.check_hints(session, layers, hint_queries, hint_topn)
        with self.in_memory(session, write=True):
            self._check_writable(session)
            for layer in layers:
                have = session.layers[layer].length
                if have != start:
                    raise FailedPrecondition(
                        f"session {session_id!r} layer {layer} holds {have} tokens: append must start at "
                        f"{have}, not {start}"
                    )
            growth = sum(session.layers[layer].bytes_after_append(n_tokens) - session.layers[layer].nbytes
                         for layer in layers)
            self.registry.reserve(growth, session)
            if token_ids is not None:
                try:
                    session.token_ids.write(start, token_ids.to(torch.int64))
                except ValueError as exc:
                    raise InvalidArgument(str(exc)) from None
            self._per_layer(lambda i: session.layers[layers[i]].append(keys[i], values[i]), len(layers), parallel)
            self.tiering.on_append(session, layers, start, n_tokens)
        self.indexes.on_append(session, layers, hints)
        self.counters["appends"] += 1
        self.counters["appended_tokens"] += n_tokens * len(layers)
        return session

    def _per_layer(self, work: Callable[[int], T], count: int, parallel: bool) -> list[T]:
        """work(0..count-1): the layers of a large append in parallel (the kernels and copies release the GIL)."""
        if count <= 1 or not parallel:
            return [work(i) for i in range(count)]
        return list(self.scan_pool.map(work, range(count)))

    def _check_writable(self, session: Session) -> None:
        if session.deleted:
            raise FailedPrecondition(f"session {session.session_id!r} was deleted")
        if session.state is State.SEALED:
            raise FailedPrecondition(f"session {session.session_id!r} is sealed (read-only)")
        if session.state is State.DAMAGED:
            raise FailedPrecondition(f"session {session.session_id!r} is damaged and cannot be used")

    def retrieve(self, tenant: str, session_ids: list[str], layer: int, queries: torch.Tensor, k: int,
                 mode: Mode, ranges: list[tuple[int, int]] | None, scale: float, exact: bool,
                 params: dict[str, str], past: retro.PastQueries | None = None,
                 candidates: torch.Tensor | None = None, into: list[AttendSlots] | None = None
                 ) -> tuple[list[SequenceResult], list[Session], list[bool]]:
        """`past`: RetroAttention's past queries (kvd.retro); their results land in each result's past_*.
        `candidates`: [n, Hq, C] positions to choose the top-k from instead of searching (lookahead).
        `into` (mode ATTENTION): per sequence, where a result may be written in place (SequenceResult.in_place)."""
        sessions = self._retrieve_sessions(tenant, session_ids)
        first = sessions[0].shape
        check_range("layer", layer, 0, min(s.shape.num_layers for s in sessions) - 1)
        spec = self._retrieve_spec(sessions, queries, k, mode, scale, exact, params, into,
                                   searching=not exact and candidates is None)
        spec.layer = layer
        check_finite("queries", queries)
        if past is not None:
            if mode is not Mode.ATTENTION:
                raise InvalidArgument(f"past queries need mode ATTENTION, not {mode.name}")
            past = retro.check_past(past, len(sessions), first.num_query_heads, first.head_dim)
        if candidates is not None:
            if past is not None:
                raise InvalidArgument("candidates and past queries cannot be combined")
            check_dtype("candidates", candidates, (torch.int32, torch.int64))
            if candidates.dim() != 3 or tuple(candidates.shape[:2]) != (len(sessions), first.num_query_heads) \
                    or not 1 <= candidates.shape[2] <= MAX_CANDIDATES:
                raise InvalidArgument(f"candidates must be [{len(sessions)}, {first.num_query_heads}, C] with "
                                      f"1 <= C <= {MAX_CANDIDATES}, got {list(candidates.shape)}")
            candidates = candidates.long()
        if ranges is not None and len(ranges) != len(sessions):
            raise InvalidArgument(f"{len(ranges)} ranges given for {len(sessions)} sequences")
        results, promoted = self._serve_retrieve(sessions, queries, spec, ranges, past, candidates)
        return results, sessions, promoted

    def prepare_retrieve(self, tenant: str, session_ids: list[str], queries: torch.Tensor, k: int, scale: float,
                         exact: bool, params: dict[str, str], into: list[AttendSlots] | None,
                         past: retro.PastQueries | None = None, checked: torch.Tensor | None = None
                         ) -> PreparedRetrieve:
        """Validate a mode ATTENTION Retrieve's fixed part once (kvd.prepared): `queries` (and `past`) are the
        slots whose contents change between runs, `into` where every run writes its results (with past queries,
        `index.base.packed_slots`); `checked`: the tensor whose values each run checks for NaN/Inf (default
        `queries`; the stacked queries where the past queries are stacked with them, so that they are not checked
        twice)."""
        sessions = self._retrieve_sessions(tenant, session_ids)
        spec = self._retrieve_spec(sessions, queries, k, Mode.ATTENTION, scale, exact, params, into,
                                   searching=not exact)
        if past is not None:
            first = sessions[0].shape
            retro.check_past(past, len(sessions), first.num_query_heads, first.head_dim)
        return PreparedRetrieve(tenant, list(session_ids), queries, spec, sessions,
                                ingest_kernels.nonfinite_counter(queries if checked is None else checked), past,
                                past_in_checked=checked is not None)

    def retrieve_prepared(self, plan: PreparedRetrieve, layer: int, ranges: list[tuple[int, int]] | None
                          ) -> tuple[list[SequenceResult], list[bool]]:
        """One run of a prepared Retrieve: only what can change between runs is checked again (the sessions,
        which may have been deleted or recreated, the layer, the ranges and the queries' values)."""
        sessions = [self.session(plan.tenant, sid) for sid in plan.session_ids]
        for i, session in enumerate(sessions):
            if session is not plan.sessions[i]:
                self._check_replacement(plan, i, session)
            if session.state is State.DAMAGED:
                raise FailedPrecondition(f"session {session.session_id!r} is damaged and cannot be served")
        check_range("layer", layer, 0, min(s.shape.num_layers for s in sessions) - 1)
        if ranges is not None and len(ranges) != len(sessions):
            raise InvalidArgument(f"{len(ranges)} ranges given for {len(sessions)} sequences")
        if bad := plan.count_nonfinite():
            raise InvalidArgument(f"queries contains {bad} NaN or infinite values")
        past = plan.checked_past
        if plan.past is not None and past is None:
            first = sessions[0].shape
            past = retro.check_past(plan.past, len(sessions), first.num_query_heads, first.head_dim,
                                    finite=not plan.past_in_checked)
            if plan.past_in_checked and past.queries is plan.past.queries and past.seen_ids is plan.past.seen_ids \
                    and past.seen_from is plan.past.seen_from:
                # no value to check and nothing converted: the checked views serve every later run as they are
                plan.checked_past = past = past.with_rows()
        spec = plan.spec
        spec.layer = layer  # a plan runs one call at a time (its connection's thread)
        return self._serve_retrieve(sessions, plan.queries, spec, ranges, past, None)

    def _check_replacement(self, plan: PreparedRetrieve, i: int, session: Session) -> None:
        """A plan's session was deleted and created again under its id: serve it only if the plan still fits."""
        shape, prepared = session.shape, plan.sessions[i].shape
        if (shape.num_query_heads, shape.head_dim) != (prepared.num_query_heads, prepared.head_dim):
            raise FailedPrecondition(f"session {session.session_id!r} was recreated with another shape; prepare "
                                     "the Retrieve again")
        if plan.spec.params and not plan.spec.exact:
            self.indexes.check_search_params(session, plan.spec.params)
        plan.sessions[i] = session

    def _retrieve_sessions(self, tenant: str, session_ids: list[str]) -> list[Session]:
        if not session_ids:
            raise InvalidArgument("retrieve needs at least one session")
        sessions = [self.session(tenant, sid) for sid in session_ids]
        first = sessions[0].shape
        for session in sessions:
            if session.state is State.DAMAGED:
                raise FailedPrecondition(f"session {session.session_id!r} is damaged and cannot be served")
            if (session.shape.num_query_heads, session.shape.head_dim) != (first.num_query_heads, first.head_dim):
                raise InvalidArgument("sessions of one retrieve must share num_query_heads and head_dim")
        return sessions

    def _retrieve_spec(self, sessions: list[Session], queries: torch.Tensor, k: int, mode: Mode, scale: float,
                       exact: bool, params: dict[str, str], into: list[AttendSlots] | None, searching: bool
                       ) -> RetrieveSpec:
        """The checks of a Retrieve's parts that do not change from layer to layer; its spec (layer 0)."""
        first = sessions[0].shape
        check_range("k", k, 1, MAX_K)
        check_dtype("queries", queries, QUERY_DTYPES)
        check_shape("queries", queries, (len(sessions), first.num_query_heads, first.head_dim))
        scale = check_scale(scale) or default_scale(first.head_dim)
        threads = params.get("threads", "0")
        if not threads.isdigit() or int(threads) > MAX_THREADS:
            raise InvalidArgument(f"search param threads must be an integer in [0, {MAX_THREADS}], not {threads!r}")
        if into is not None and (mode is not Mode.ATTENTION or len(into) != len(sessions)):
            raise InvalidArgument("result slots are for mode ATTENTION, one per sequence")
        if searching:
            for session in sessions:
                self.indexes.check_search_params(session, params)
        return RetrieveSpec(layer=0, k=k, mode=mode, scale=scale, exact=exact, params=params, pool=self.scan_pool,
                            threads=int(threads), into=into)

    def _serve_retrieve(self, sessions: list[Session], queries: torch.Tensor, spec: RetrieveSpec,
                        ranges: list[tuple[int, int]] | None, past: retro.PastQueries | None,
                        candidates: torch.Tensor | None) -> tuple[list[SequenceResult], list[bool]]:
        searching = not spec.exact and candidates is None
        layer = spec.layer
        promoted = [False] * len(sessions)
        while True:
            for i, session in enumerate(sessions):
                promoted[i] = self.tiering.promote(session) or promoted[i]
                if searching:
                    self.indexes.on_retrieve(session, layer)
            try:
                results = retrieve_batch(sessions, queries.float(), spec, ranges, self.fanout, past, candidates)
                break
            except SessionSpilled:
                continue
        self.counters["retrieves"] += 1
        self.counters["retrieved_sequences"] += len(sessions)
        if searching:
            # A ready index that could not serve (e.g. a range narrower than it covers) fell back to the exact
            # scan: correct, but slower than the operator may expect, so it is counted.
            self.counters["retrieves_index_bypassed"] += sum(
                1 for session, result in zip(sessions, results, strict=True)
                if (slot := session.indexes[layer]) is not None and slot.ready and result.index_kind != slot.kind)
        return results, promoted

    def fetch(self, tenant: str, session_id: str, layers: list[int], begin: int, end: int,
              with_token_ids: bool) -> FetchResult:
        session = self.session(tenant, session_id)
        shape = session.shape
        layers = layers or list(range(shape.num_layers))
        for layer in layers:
            check_range("layer", layer, 0, shape.num_layers - 1)
        with self.in_memory(session, write=False):
            length = min(session.layers[layer].length for layer in layers)
            end = length if end == 0 else end
            if begin > end or end > length:
                raise InvalidArgument(f"fetch range [{begin}, {end}) is outside the {length} stored tokens")
            keys = torch.stack([session.layers[layer].view()[0][:, begin:end] for layer in layers])
            values = torch.stack([session.layers[layer].view()[1][:, begin:end] for layer in layers])
            token_ids = None
            if with_token_ids:
                stored = session.token_ids.view()
                token_ids = stored[begin: min(end, stored.numel())].clone()
        self.counters["fetches"] += 1
        return FetchResult(keys, values, token_ids, begin, end)

    def persist(self, tenant: str, session_id: str, seal: bool) -> Session:
        session = self.session(tenant, session_id)
        if session.state is State.DAMAGED:
            raise FailedPrecondition(f"session {session_id!r} is damaged and cannot be persisted")
        self.tiering.persist(session, seal)
        self.counters["persists"] += 1
        return session

    def truncate(self, tenant: str, session_id: str, num_tokens: int) -> Session:
        session = self.session(tenant, session_id)
        with self.in_memory(session, write=True):
            self._check_writable(session)
            if num_tokens > session.num_tokens:
                raise InvalidArgument(f"cannot truncate to {num_tokens} tokens: the session has {session.num_tokens}")
            for layer in session.layers:
                layer.truncate(num_tokens)
            session.token_ids.truncate(num_tokens)
            self.tiering.on_truncate(session, num_tokens)
        self.indexes.on_truncate(session, num_tokens)
        return session

    def lookup_prefix(self, tenant: str, token_ids: torch.Tensor) -> tuple[str, int]:
        return self.tiering.lookup_prefix(tenant, token_ids)
