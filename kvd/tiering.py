"""Tiering between RAM and the LMDB disk tier: persist, spill, promote, evict, recover, export and import.

Durability contract: Persist returns after the session's tokens up to that point are committed to LMDB and
(with storage.durability = "sync") fsynced. What LMDB holds is only ever a committed manifest plus the chunks it
names, so after a crash every durable session is found again byte-identical and nothing is half-written; chunk
records left by an interrupted write are removed at startup and logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from kvd_client import wire

from kvd.config import Config
from kvd.errors import DataLoss, FailedPrecondition, ResourceExhausted
from kvd.index.manager import IndexManager
from kvd.store import records
from kvd.store.disk import DiskStore
from kvd.store.export import pack_session, unpack_session
from kvd.store.prefix import PrefixIndex
from kvd.store.registry import Registry
from kvd.store.session import ModelShape, Session, SessionOptions, State, Tier

log = logging.getLogger("kvd.tiering")
RECORD_TOKENS = 4096        # tokens per K/V record: bounded memory per write and parallel reads


def _libc_trim() -> None:
    """Give freed heap pages back to the OS so that the daemon's resident memory really drops."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def manifest_of(session: Session, layers: list[list[records.Chunk]], tokens: list[records.Chunk],
                indexes: dict[str, int]) -> records.Manifest:
    shape, options = session.shape, session.options
    return records.Manifest(
        tenant=session.tenant, session_id=session.session_id,
        shape={"num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads,
               "num_query_heads": shape.num_query_heads, "head_dim": shape.head_dim,
               "dtype": records.DTYPE_NAMES[shape.dtype]},
        options={"index_kind": options.index_kind, "index_params": options.index_params, "pinned": options.pinned,
                 "ttl_seconds": options.ttl_seconds, "sink_tokens": options.sink_tokens,
                 "window_tokens": options.window_tokens, "labels": options.labels},
        state=session.state.value, durable_tokens=session.durable_tokens, created=session.created,
        last_access=session.last_access, layers=layers, tokens=tokens, indexes=indexes,
        damaged_reason=session.damaged_reason,
    )


def session_from_manifest(manifest: records.Manifest) -> Session:
    shape = dict(manifest.shape)
    shape["dtype"] = records.DTYPES[shape["dtype"]]
    session = Session(manifest.session_id, manifest.tenant, ModelShape(**shape), SessionOptions(**manifest.options))
    session.created, session.last_access = manifest.created, manifest.last_access
    session.state = State(manifest.state)
    session.durable_tokens = manifest.durable_tokens
    session.damaged_reason = manifest.damaged_reason
    session.manifest = manifest
    session.tier = Tier.DISK
    for layer, chunks in zip(session.layers, manifest.layers, strict=True):
        layer.length = sum(c.length for c in chunks)
    return session


class Tiering:
    def __init__(self, config: Config, registry: Registry, indexes: IndexManager) -> None:
        self.config = config
        self.registry = registry
        self.indexes = indexes
        self.prefixes = PrefixIndex()
        self.store: DiskStore | None = None
        self.counters: dict[str, float] = {"spills": 0, "spilled_bytes": 0, "promotions": 0, "promoted_bytes": 0,
                                           "evictions": 0, "damaged": 0, "rolled_back_records": 0}
        self.io = ThreadPoolExecutor(max_workers=max(2, config.server.workers or os.cpu_count() or 4),
                                     thread_name_prefix="kvd-io")
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._disk_lock = threading.Lock()   # serializes disk-cap accounting and eviction
        registry.make_room = self.make_room

    # -- startup and shutdown --------------------------------------------------------------------------

    def open(self) -> list[str]:
        storage = self.config.storage
        self.store = DiskStore(storage.data_dir, storage.lmdb_map_size, sync=storage.durability == "sync")
        messages = self._recover()
        if storage.durability == "interval":
            self._syncer = threading.Thread(target=self._sync_loop, name="kvd-sync", daemon=True)
            self._syncer.start()
        return messages

    def _recover(self) -> list[str]:
        assert self.store is not None
        messages: list[str] = []
        known: dict[bytes, records.Manifest] = {}
        for key, raw in self.store.manifests():
            tenant, session_id = records.split_session_key(key)
            try:
                manifest = records.Manifest.from_bytes(raw)
            except (records.CorruptRecord, ValueError, TypeError, KeyError) as exc:
                messages.append(f"session {session_id!r} of tenant {tenant!r}: unreadable manifest ({exc}); "
                                f"its records are removed")
                continue
            known[bytes(key)] = manifest
        referenced = set()
        for manifest in known.values():
            referenced.update(self._record_keys(manifest))
            session = session_from_manifest(manifest)
            try:
                self._load_token_ids(session)
            except records.CorruptRecord as exc:
                self._mark_damaged(session, str(exc))
            self.registry.add(session)
            self.prefixes.update(session.tenant, session.session_id, session.token_ids.view())
        stored = set(self.store.chunk_keys())
        orphans = [k for k in stored if k not in referenced]
        if orphans:
            self.store.delete_chunks(orphans)
            self.counters["rolled_back_records"] += len(orphans)
            messages.append(f"rolled back {len(orphans)} records of interrupted writes")
        missing = [k for k in referenced if k not in stored]
        if missing:
            messages.append(f"{len(missing)} records named by manifests are missing")
        log.info("disk tier recovered", extra={"fields": {"sessions": len(known), "path": str(self.store.path)}})
        return messages

    def _record_keys(self, manifest: records.Manifest) -> Iterator[bytes]:
        t, s = manifest.tenant, manifest.session_id
        for layer, chunks in enumerate(manifest.layers):
            for chunk in chunks:
                yield records.chunk_key(t, s, records.KIND_KV, layer, chunk.start)
        for chunk in manifest.tokens:
            yield records.chunk_key(t, s, records.KIND_TOKENS, 0, chunk.start)
        for layer in manifest.indexes:
            yield records.chunk_key(t, s, records.KIND_INDEX, int(layer), 0)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.config.storage.sync_interval_seconds):
            if self.store is not None:
                self.store.sync()

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(5)
        if self.store is not None:
            self.store.close()
            self.store = None
        self.io.shutdown(wait=True)

    # -- hooks from the engine -------------------------------------------------------------------------

    def ensure_loaded(self, tenant: str, session_id: str) -> None:
        """Every durable session is registered at startup; nothing to load lazily."""

    def on_create(self, session: Session) -> None:
        pass

    def on_append(self, session: Session, layers: list[int], start: int, n_tokens: int) -> None:
        if session.token_ids.length >= start + n_tokens and session.token_ids.length > 0:
            self.prefixes.update(session.tenant, session.session_id, session.token_ids.view())

    def on_truncate(self, session: Session, num_tokens: int) -> None:
        if session.manifest is not None:
            current = session.rewrite_from if session.rewrite_from is not None else num_tokens
            session.rewrite_from = min(current, num_tokens)
        session.durable_tokens = min(session.durable_tokens, num_tokens)
        self.prefixes.update(session.tenant, session.session_id, session.token_ids.view())

    # -- persist ---------------------------------------------------------------------------------------

    def persist(self, session: Session, seal: bool) -> None:
        """Commit the session's tokens to LMDB (synced per config); returns once durable."""
        store = self._require_store()
        with session.tier_lock:
            if session.tier is Tier.DISK:
                with session.lock.write():
                    session.durable_tokens = session.num_tokens
                    if seal:
                        session.state = State.SEALED
                    assert session.manifest is not None
                    manifest = manifest_of(session, session.manifest.layers, session.manifest.tokens,
                                           session.manifest.indexes)
                    store.put_manifest(manifest)
                    session.manifest = manifest
                return
            with session.lock.write():
                self._write_session(session, seal, with_indexes=False)

    def _write_session(self, session: Session, seal: bool, with_indexes: bool) -> None:
        """Called with the session write-locked and in memory."""
        store = self._require_store()
        old = session.manifest
        rewrite = session.rewrite_from
        layers: list[list[records.Chunk]] = []
        writes: list[tuple[bytes, torch.Tensor | bytes, int, int, int]] = []  # key, source, layer, a, b
        stale: list[bytes] = []
        t, s = session.tenant, session.session_id
        for number, layer in enumerate(session.layers):
            kept = list(old.layers[number]) if old is not None else []
            if rewrite is not None:
                dropped = [c for c in kept if c.start + c.length > rewrite]
                kept = [c for c in kept if c.start + c.length <= rewrite]
                stale += [records.chunk_key(t, s, records.KIND_KV, number, c.start) for c in dropped]
            written = sum(c.length for c in kept)
            for a in range(written, layer.length, RECORD_TOKENS):
                b = min(layer.length, a + RECORD_TOKENS)
                key = records.chunk_key(t, s, records.KIND_KV, number, a)
                writes.append((key, layer, number, a, b))
                element = torch.empty((), dtype=layer.dtype).element_size()
                kept.append(records.Chunk(a, b - a, 2 * layer.num_kv_heads * (b - a) * layer.head_dim * element))
            layers.append(kept)
        token_chunks: list[records.Chunk] = []
        token_payload = b""
        if session.token_ids.length:
            token_payload = bytes(wire.tensor_bytes(session.token_ids.view().contiguous()))
            token_chunks = [records.Chunk(0, session.token_ids.length, len(token_payload))]
        if old is not None and old.tokens and not token_chunks:
            stale.append(records.chunk_key(t, s, records.KIND_TOKENS, 0, 0))
        index_sizes: dict[str, int] = {}
        index_blobs: dict[int, bytes] = {}
        if with_indexes:
            index_blobs = self.indexes.export_blobs(session)
            index_sizes = {str(layer): len(blob) for layer, blob in index_blobs.items()}
        if old is not None:
            stale += [records.chunk_key(t, s, records.KIND_INDEX, int(layer), 0) for layer in old.indexes
                      if int(layer) not in index_blobs]
        rewritten = {key for key, *_ in writes}
        stale = [key for key in stale if key not in rewritten]
        new_bytes = (sum(b - a for _, _, _, a, b in writes) * self._bytes_per_token_record(session)
                     + len(token_payload) + sum(index_sizes.values()))
        self._ensure_disk_room(session, new_bytes)
        previous_durable = session.durable_tokens
        session.durable_tokens = session.num_tokens
        if seal:
            session.state = State.SEALED
        manifest = manifest_of(session, layers, token_chunks, index_sizes)

        def payloads() -> Iterator[tuple[bytes, bytes | memoryview]]:
            for key, layer, _number, a, b in writes:
                keys, values = layer.view()
                yield key, (bytes(wire.tensor_bytes(keys[:, a:b].contiguous()))
                            + bytes(wire.tensor_bytes(values[:, a:b].contiguous())))
            if token_chunks:
                yield records.chunk_key(t, s, records.KIND_TOKENS, 0, 0), token_payload
            for layer_number, blob in index_blobs.items():
                yield records.chunk_key(t, s, records.KIND_INDEX, layer_number, 0), blob

        try:
            store.write(manifest, payloads(), delete=stale)
        except Exception:
            session.durable_tokens = previous_durable
            raise
        if seal:
            for layer in session.layers:
                layer.shrink_to_fit()
        session.manifest = manifest
        session.rewrite_from = None

    @staticmethod
    def _bytes_per_token_record(session: Session) -> int:
        shape = session.shape
        return 2 * shape.num_kv_heads * shape.head_dim * torch.empty((), dtype=shape.dtype).element_size()

    def persist_all(self) -> None:
        if self.store is None:
            return
        for session in self.registry.sessions():
            if session.tier is Tier.MEMORY and session.state is not State.DAMAGED and not session.deleted \
                    and (session.manifest is None or session.num_tokens != session.durable_tokens
                         or session.rewrite_from is not None):
                try:
                    self.persist(session, seal=False)
                except Exception:
                    log.exception("could not persist session %s at shutdown", session.session_id)

    # -- spill and promote -----------------------------------------------------------------------------

    def make_room(self, needed: int, requester: Session | None) -> bool:
        """Spill least-recently-used idle sessions to disk until `needed` bytes are freed."""
        if self.store is None:
            return False
        freed = 0
        candidates = [s for s in self.registry.sessions() if s.tier is Tier.MEMORY and s is not requester
                      and s.state is not State.DAMAGED and not s.deleted]
        for session in sorted(candidates, key=lambda s: s.last_access):
            freed += self.spill(session)
            if freed >= needed:
                return True
        return freed >= needed

    def spill(self, session: Session) -> int:
        """Write the whole session (KV and index state) to LMDB and free it from RAM; returns bytes freed.
        Sessions in use (locked) are skipped."""
        if not session.tier_lock.acquire(blocking=False):
            return 0
        try:
            if session.tier is not Tier.MEMORY or not session.lock.try_write():
                return 0
            try:
                before = session.memory_bytes
                self._write_session(session, seal=session.state is State.SEALED, with_indexes=True)
                for layer in session.layers:
                    layer.release()
                self.indexes.drop(session)
                session.tier = Tier.DISK
            finally:
                session.lock.release_write()
        finally:
            session.tier_lock.release()
        _libc_trim()
        self.counters["spills"] += 1
        self.counters["spilled_bytes"] += before
        log.info("session spilled to disk", extra={"fields": {"session": session.session_id, "bytes": before}})
        return before

    def promote(self, session: Session) -> bool:
        """Bring a spilled session back into RAM; True if it was on disk."""
        if session.tier is Tier.MEMORY:
            return False
        with session.tier_lock:
            if session.tier is Tier.MEMORY:
                return False
            if session.state is State.DAMAGED:
                raise DataLoss(f"session {session.session_id!r} is damaged: {session.damaged_reason}")
            manifest = session.manifest
            assert manifest is not None
            kv_bytes = sum(c.nbytes for layer in manifest.layers for c in layer)
            self.registry.reserve(kv_bytes, session)
            with session.lock.write():
                try:
                    blobs = self._load(session, manifest)
                except records.CorruptRecord as exc:
                    for layer in session.layers:
                        layer.release()
                    self._mark_damaged(session, str(exc))
                    raise DataLoss(f"session {session.session_id!r} is damaged: {exc}") from None
                session.tier = Tier.MEMORY
                session.promotions += 1
            self.indexes.import_blobs(session, blobs)
        self.counters["promotions"] += 1
        self.counters["promoted_bytes"] += kv_bytes
        return True

    def _load(self, session: Session, manifest: records.Manifest) -> dict[int, memoryview | bytes]:
        store = self._require_store()
        shape = session.shape
        t, s = session.tenant, session.session_id

        def load_layer(number: int) -> None:
            chunks = manifest.layers[number]
            length = sum(c.length for c in chunks)
            keys = torch.empty((shape.num_kv_heads, length, shape.head_dim), dtype=shape.dtype)
            values = torch.empty_like(keys)

            def consume(key: bytes, payload: memoryview) -> None:
                _, _, _, start = records.parse_chunk_key(key)
                n = next(c.length for c in chunks if c.start == start)
                half = len(payload) // 2
                dims = (shape.num_kv_heads, n, shape.head_dim)
                keys[:, start: start + n].copy_(wire.decode_bytes(payload[:half], shape.dtype, dims))
                values[:, start: start + n].copy_(wire.decode_bytes(payload[half:], shape.dtype, dims))

            store.read(((records.chunk_key(t, s, records.KIND_KV, number, c.start),
                         f"session {s!r} layer {number} tokens {c.start}..{c.start + c.length}") for c in chunks),
                       consume)
            session.layers[number].load(keys, values)

        list(self.io.map(load_layer, range(shape.num_layers)))
        self._load_token_ids(session)
        blobs: dict[int, memoryview | bytes] = {}

        def keep_blob(key: bytes, payload: memoryview) -> None:
            blobs[records.parse_chunk_key(key)[2]] = bytes(payload)

        store.read(((records.chunk_key(t, s, records.KIND_INDEX, int(layer), 0), f"session {s!r} index {layer}")
                    for layer in manifest.indexes), keep_blob)
        return blobs

    def _load_token_ids(self, session: Session) -> None:
        manifest = session.manifest
        if manifest is None or not manifest.tokens:
            return
        store = self._require_store()

        def consume(key: bytes, payload: memoryview) -> None:
            session.token_ids.load(wire.decode_bytes(bytearray(payload), torch.int64, (len(payload) // 8,)))

        store.read([(records.chunk_key(session.tenant, session.session_id, records.KIND_TOKENS, 0, 0),
                     f"session {session.session_id!r} token ids")], consume)

    def _mark_damaged(self, session: Session, reason: str) -> None:
        session.state = State.DAMAGED
        session.damaged_reason = reason
        self.counters["damaged"] += 1
        log.error("session damaged", extra={"fields": {"session": session.session_id, "reason": reason}})
        if self.store is not None and session.manifest is not None:
            manifest = session.manifest
            manifest.state, manifest.damaged_reason = State.DAMAGED.value, reason
            try:
                self.store.put_manifest(manifest)
            except Exception:
                log.exception("could not record the damage of session %s", session.session_id)

    # -- disk cap --------------------------------------------------------------------------------------

    def _ensure_disk_room(self, requester: Session, extra: int) -> None:
        budget = self.config.storage.disk_budget
        if not budget or extra <= 0:
            return
        with self._disk_lock:
            used = self.disk_bytes()
            if used + extra <= budget:
                return
            candidates = [s for s in self.registry.sessions() if s.manifest is not None and s is not requester
                          and not s.options.pinned and not s.deleted]
            for victim in sorted(candidates, key=lambda s: s.last_access):
                used -= self._evict(victim)
                if used + extra <= budget:
                    return
        raise ResourceExhausted(
            f"disk budget exceeded: {used + extra} bytes needed, budget {budget} bytes, and no unpinned session "
            f"is left to evict"
        )

    def _evict(self, session: Session) -> int:
        freed = session.disk_bytes
        store = self._require_store()
        if session.tier is Tier.DISK:
            session.deleted = True
            self.registry.remove(session)
            self.prefixes.remove(session.tenant, session.session_id)
        store.delete_session(session.tenant, session.session_id)
        session.manifest = None
        session.durable_tokens = 0
        self.counters["evictions"] += 1
        log.warning("session evicted from the disk tier", extra={"fields": {"session": session.session_id,
                                                                            "bytes": freed}})
        return freed

    # -- delete, lookup, stats -------------------------------------------------------------------------

    def delete(self, session: Session) -> int:
        self.prefixes.remove(session.tenant, session.session_id)
        freed = session.disk_bytes
        if self.store is not None and session.manifest is not None:
            self.store.delete_session(session.tenant, session.session_id)
            session.manifest = None
        _libc_trim()
        return freed

    def lookup_prefix(self, tenant: str, token_ids: torch.Tensor) -> tuple[str, int]:
        candidates, _depth = self.prefixes.candidates(tenant, token_ids)
        if not candidates:
            candidates = {s.session_id for s in self.registry.sessions(tenant) if s.token_ids.length}
        best_id, best = "", 0
        for session_id in sorted(candidates):
            session = self.registry.find(tenant, session_id)
            if session is None or session.state is State.DAMAGED:
                continue
            stored = session.token_ids.view()
            n = min(len(stored), len(token_ids), session.num_tokens)
            mismatch = (stored[:n] != token_ids[:n]).nonzero()
            matched = int(mismatch[0]) if len(mismatch) else n
            if matched > best:
                best_id, best = session_id, matched
        return best_id, best

    def disk_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.registry.sessions())

    def _require_store(self) -> DiskStore:
        if self.store is None:
            raise FailedPrecondition("the disk tier is not open")
        return self.store

    # -- export and import -----------------------------------------------------------------------------

    def export_chunks(self, tenant: str, session_id: str) -> list[bytes]:
        session = self.registry.get(tenant, session_id)
        self.promote(session)
        with session.lock.read():
            data = pack_session(session)
        return [data[i: i + (4 << 20)] for i in range(0, len(data), 4 << 20)]

    def import_bytes(self, tenant: str, data: bytes) -> Session:
        session = unpack_session(data, tenant)
        if self.registry.find(tenant, session.session_id) is not None:
            from kvd.errors import AlreadyExists

            raise AlreadyExists(f"session {session.session_id!r} already exists; delete it first")
        self.registry.reserve(session.memory_bytes, None)
        self.registry.add(session)
        self.prefixes.update(tenant, session.session_id, session.token_ids.view())
        with session.lock.write():
            self._write_session(session, seal=session.state is State.SEALED, with_indexes=False)
        return session
