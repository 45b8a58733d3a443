"""Per-session, per-layer index lifecycle: background builds, exact service until ready, incremental adds.

A layer's index covers the offloaded positions [base, base + count) where base = the session's sink size.
Keys offloaded after the build (decode tokens leaving the GPU window) form an exact-scanned tail until they
are added to the index in the background. A search whose range is narrower than what the index covers is
served exactly, so results never include positions outside the requested range.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kvd import metrics
from kvd.config import IndexConfig
from kvd.errors import InvalidArgument
from kvd.index.base import Attended, AttendSlots, BuildHints, IndexShape, KeyIndex, StoredKeys
from kvd.index.flat import exact_scores, scores_at
from kvd.retro import PastQueries
from kvd.store.session import Session, Tier

log = logging.getLogger("kvd.index")
KINDS = {"hnsw": "kvd.index.hnsw:HnswIndex", "graph": "kvd.index.graph:GraphIndex", "wave": "kvd.index.wave:WaveIndex"}
# Tail keys (offloaded after the build) are added to the index once this many have accumulated.
ADD_BATCH_TOKENS = 512
_ACCEPTED_PARAMS_KEPT = 1024  # remembered valid search-param sets (cleared when full)
_BLOB_HEADER = struct.Struct("<I")


def index_class(kind: str) -> type[KeyIndex]:
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


class LayerIndex:
    """The index of one layer of one session, and the bookkeeping of what it covers."""

    def __init__(self, kind: str, shape: IndexShape, params: dict[str, str], base: int) -> None:
        self.kind = kind
        self.shape = shape
        self.params = params
        self.base = base
        self.index: KeyIndex | None = None
        self.ready = False
        self.building = False
        self.adding = False
        self.failed = ""      # why the build failed (the layer is then served by the exact scan)
        self.add_failed = ""  # why the last add of decode keys failed (they are then scanned exactly)
        self.add_retry_at = 0  # after a failed add, the next waits until the layer's offloaded range ends here
        self.from_hints = False  # the ready index was built from the client's hints (attention-aware)
        self.hint_queries: list[torch.Tensor] = []
        self.hint_topn: list[torch.Tensor] = []
        self.lock = threading.Lock()

    @property
    def error(self) -> str:
        """What an operator should know went wrong with this layer's index ("" when nothing did)."""
        if self.failed:
            return f"build failed: {self.failed}"
        return f"adding keys failed: {self.add_failed}" if self.add_failed else ""

    @property
    def indexed_tokens(self) -> int:
        return self.index.count if self.index is not None and self.ready else 0

    @property
    def covered_end(self) -> int:
        return self.base + self.indexed_tokens

    def nbytes(self) -> int:
        return self.index.nbytes() if self.index is not None and self.ready else 0

    def search(self, queries: torch.Tensor, keys: torch.Tensor, k: int, scale: float, begin: int, end: int,
               params: dict[str, str]
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, str] | None:
        """Top-k over [begin, end) from the index plus an exact scan of the uncovered tail; None when the
        request cannot be served from the index (not ready, or a range narrower than the covered part)."""
        served = self._serving(begin, end)
        if served is None:
            return None
        index, covered_end = served
        # hnsw's exact work counter replays every search: a benchmark's tool, off when serving.
        found = index.search(queries, k, scale, {"touched": "off", **params}, stored=StoredKeys(keys, self.base))
        shift = self.base - found.id_base
        ids = found.ids if shift == 0 else torch.where(found.ids >= 0, found.ids + shift, found.ids)
        if found.scores is not None and found.scores_from in (torch.float32, keys.dtype):
            scores = found.scores  # scored from an exact copy of these keys: no second pass over them
        else:
            scores = scores_at(queries, keys, ids.clamp(min=0))
        extra = [(lo, hi) for lo, hi in ((begin, self.base), (covered_end, end)) if hi > lo]
        estimate = None if found.estimate is None else (found.estimate.output, found.estimate.lse)
        if not extra and found.ranked and scores is found.scores and ids.shape[1] <= k:
            return ids, scores, estimate, self.kind  # already the top-k in order, -inf after the last valid one
        scores = scores.masked_fill(ids < 0, float("-inf"))
        for lo, hi in extra:
            tail_scores = exact_scores(queries, keys, lo, hi)
            tail_ids = torch.arange(lo, hi).expand(queries.shape[0], -1)
            ids = torch.cat([ids, tail_ids], dim=1)
            scores = torch.cat([scores, tail_scores], dim=1)
        count = min(k, ids.shape[1])
        top_scores, order = torch.topk(scores, count, dim=1)
        ids = torch.gather(ids, 1, order)
        ids = ids.masked_fill(torch.isneginf(top_scores), -1)
        return ids, top_scores, estimate, self.kind

    def search_attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, scale: float,
                      begin: int, end: int, params: dict[str, str], into: AttendSlots | None = None,
                      past: PastQueries | None = None) -> Attended | None:
        """search() and the attention over its top-k in one compiled pass (KeyIndex.search_attend), the uncovered
        tail scanned inside it; None when the index cannot serve the range or has no such pass for this call."""
        served = self._serving(begin, end)
        if served is None:
            return None
        index, covered_end = served
        tails = [(lo, hi) for lo, hi in ((begin, self.base), (covered_end, end)) if hi > lo]
        return index.search_attend(queries, k, scale, {"touched": "off", **params}, StoredKeys(keys, self.base),
                                   values, tails, into, past)

    def _serving(self, begin: int, end: int) -> tuple[KeyIndex, int] | None:
        """(the ready index, the end of what it covers) when it can serve [begin, end), else None."""
        with self.lock:
            if not self.ready or self.index is None:
                return None
            index, covered_end = self.index, self.covered_end
        if begin > self.base or end < covered_end or covered_end <= self.base:
            return None
        return index, covered_end


class IndexManager:
    def __init__(self, config: IndexConfig) -> None:
        self.config = config
        threads = config.build_threads or os.cpu_count() or 4
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvd-index")
        # Each build already uses every core; running more at once only adds their transient memory (a
        # 512K-token layer's graphs need ~1 GiB of float32 keys while they are built), so few run together.
        self._build_slots = threading.BoundedSemaphore(max(1, min(threads, config.concurrent_builds)))
        self._queued = 0
        self._queue_lock = threading.Lock()
        self._accepted_params: set[tuple] = set()  # (kind, shape, index params, search params) checked

    # -- validation and hooks --------------------------------------------------------------------------

    def check_hints(self, session: Session, layers: list[int], queries: torch.Tensor | None,
                    topn: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        shape = session.shape
        expected = (len(layers), shape.num_query_heads)
        if queries is not None and (queries.dim() != 4 or tuple(queries.shape[:2]) != expected
                                    or queries.shape[3] != shape.head_dim):
            raise InvalidArgument(
                f"hint queries must be [{len(layers)}, {shape.num_query_heads}, n_samples, {shape.head_dim}],"
                f" got {list(queries.shape)}"
            )
        if queries is not None and not queries.is_floating_point():
            raise InvalidArgument("hint queries must be floating point")
        if topn is not None:
            if queries is None:
                raise InvalidArgument("hint top-N ids need the hint queries they belong to")
            if topn.dim() != 4 or tuple(topn.shape[:3]) != tuple(queries.shape[:3]):
                raise InvalidArgument(
                    f"hint top-N ids must be [{', '.join(map(str, queries.shape[:3]))}, N], got {list(topn.shape)}"
                )
            if topn.dtype not in (torch.int32, torch.int64):
                raise InvalidArgument("hint top-N ids must be int32 or int64")
        return queries, topn

    @staticmethod
    def check_params(kind: str, shape: IndexShape, params: dict[str, str]) -> None:
        """Refuse index params the kind cannot use (checked when the session is created: a build failing on
        them later would leave its layers served by the exact scan, with the reason only in the log)."""
        if kind not in KINDS:
            return
        try:
            index_class(kind)(shape, dict(params))
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgument(f"{kind} index_params: {exc}") from None

    def check_search_params(self, session: Session, params: dict[str, str]) -> None:
        """Refuse per-call search params the session's index kind cannot use, whether or not its index is
        built yet (a bad value must not pass while the exact scan serves and fail once the index is ready).
        A decode sends the same params with every Retrieve: accepted ones are remembered."""
        kind = session.options.index_kind
        if not params or kind not in KINDS:
            return
        shape = session.shape
        key = (kind, shape.num_kv_heads, shape.num_query_heads, shape.head_dim,
               tuple(sorted(session.options.index_params.items())), tuple(sorted(params.items())))
        if key in self._accepted_params:
            return
        try:
            index = index_class(kind)(IndexShape(shape.num_kv_heads, shape.num_query_heads, shape.head_dim),
                                      dict(session.options.index_params))
            index.check_search_params(params)
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgument(f"{kind} search_params: {exc}") from None
        if len(self._accepted_params) >= _ACCEPTED_PARAMS_KEPT:
            self._accepted_params.clear()
        self._accepted_params.add(key)

    def _slot(self, session: Session, layer: int) -> LayerIndex | None:
        kind = session.options.index_kind
        if kind not in KINDS:
            return None
        slot = session.indexes[layer]
        if slot is None:
            shape = IndexShape(session.shape.num_kv_heads, session.shape.num_query_heads, session.shape.head_dim)
            slot = LayerIndex(kind, shape, dict(session.options.index_params), session.options.sink_tokens)
            session.indexes[layer] = slot
        return slot

    def on_append(self, session: Session, layers: list[int], hints: tuple) -> None:
        queries, topn = hints
        for i, layer in enumerate(layers):
            slot = self._slot(session, layer)
            if slot is None:
                continue
            if queries is not None:
                with slot.lock:
                    if slot.ready and slot.from_hints:
                        continue  # built from hints already (later turns' keys are added to it)
                    slot.hint_queries.append(queries[i].float().clone())
                    if topn is not None:
                        slot.hint_topn.append(topn[i].to(torch.int64).clone())
                    # a client that retrieved before sending its hints got an index built without them
                    rebuild = slot.ready
                # Hints mark the end of a layer's prefill: build now (again, from them).
                self.schedule_build(session, layer, rebuild=rebuild)
            elif slot.ready:
                self._maybe_add(session, layer, slot)

    def on_retrieve(self, session: Session, layer: int) -> None:
        """The first decode query of a layer starts its build if no hints did."""
        slot = self._slot(session, layer)
        if slot is not None and not slot.ready and not slot.building and not slot.failed:
            self.schedule_build(session, layer)
        elif slot is not None and slot.ready:
            self._maybe_add(session, layer, slot)

    def on_truncate(self, session: Session, num_tokens: int) -> None:
        for layer, slot in enumerate(session.indexes):
            if slot is not None and slot.covered_end > session.offloaded_range(num_tokens)[1]:
                session.indexes[layer] = None   # rebuilt on the next retrieve

    def drop(self, session: Session) -> None:
        session.indexes = [None] * session.shape.num_layers

    # -- builds ----------------------------------------------------------------------------------------

    def schedule_build(self, session: Session, layer: int, rebuild: bool = False) -> None:
        """Build the layer's index in the background; `rebuild`: also when one is ready (it serves meanwhile)."""
        slot = session.indexes[layer]
        with slot.lock:
            if slot.building or (slot.ready and not rebuild):
                return
            slot.building = True
        with self._queue_lock:
            self._queued += 1
        self.pool.submit(self._build, session, layer, slot)

    def _build(self, session: Session, layer: int, slot: LayerIndex) -> None:
        started = time.perf_counter()
        try:
            with session.lock.read():
                if session.tier is not Tier.MEMORY or session.deleted:
                    return
                keys, values = session.layers[layer].view()
                begin, end = session.offloaded_range(keys.shape[1])
            if end - begin < 1:
                return
            kind = index_class(slot.kind)
            # a float32 copy of a long layer is GiBs: kinds that convert what they need get the stored keys
            local_keys = keys[:, begin:end] if kind.takes_session_dtype else keys[:, begin:end].float()
            local_values = values[:, begin:end].float() if slot.kind == "wave" else None
            hints = self._hints(slot, begin, end)
            index = kind(slot.shape, slot.params)
            with self._build_slots:
                index.build(local_keys, local_values, hints, stored=StoredKeys(keys, slot.base))
            with slot.lock:
                if session.indexes[layer] is slot:
                    slot.index, slot.ready, slot.from_hints = index, True, hints is not None
            metrics.INDEX_BUILD_SECONDS.labels(slot.kind).observe(time.perf_counter() - started)
            log.debug("index built", extra={"fields": {"session": session.session_id, "layer": layer,
                                                       "kind": slot.kind, "keys": end - begin}})
        except Exception as exc:  # a failed build leaves the layer served exactly, and says why
            metrics.INDEX_FAILURES.labels(slot.kind, "build").inc()
            slot.failed = str(exc)
            log.exception("index build failed for session %s layer %d", session.session_id, layer)
        finally:
            slot.building = False
            with self._queue_lock:
                self._queued -= 1
        if slot.ready and slot.hint_queries and not slot.failed and session.indexes[layer] is slot:
            self.schedule_build(session, layer, rebuild=True)  # hints arrived while it was built without them

    @staticmethod
    def _hints(slot: LayerIndex, begin: int, end: int) -> BuildHints | None:
        with slot.lock:
            queries = torch.cat(slot.hint_queries, dim=1) if slot.hint_queries else None
            topn = torch.cat(slot.hint_topn, dim=1) if slot.hint_topn and len(slot.hint_topn) == len(
                slot.hint_queries) else None
            slot.hint_queries, slot.hint_topn = [], []
        if queries is None:
            return None
        if topn is not None:
            # Positions -> local ids; ids outside the indexed range (sink, window) are dropped as -1.
            inside = (topn >= begin) & (topn < end)
            topn = torch.where(inside, topn - begin, torch.full_like(topn, -1))
        return BuildHints(queries=queries, topn_ids=topn)

    def _maybe_add(self, session: Session, layer: int, slot: LayerIndex) -> None:
        with slot.lock:
            if slot.adding or not slot.ready:
                return
            length = session.layers[layer].length
            end = session.offloaded_range(length)[1]
            if end - slot.covered_end < ADD_BATCH_TOKENS or end < slot.add_retry_at:
                return
            slot.adding = True
        self.pool.submit(self._add, session, layer, slot)

    def _add(self, session: Session, layer: int, slot: LayerIndex) -> None:
        end = slot.covered_end
        try:
            with session.lock.read():
                if session.tier is not Tier.MEMORY or session.deleted:
                    return
                keys, values = session.layers[layer].view()
                end = session.offloaded_range(keys.shape[1])[1]
                start = slot.covered_end
                new_keys = keys[:, start:end].float()
                new_values = values[:, start:end].float() if slot.kind == "wave" else None
            if end <= start:
                return
            # Searches keep using the index while keys are added: add into it under the slot lock only
            # for kinds whose add() is not safe to run beside search().
            with slot.lock:
                if slot.covered_end != start:  # rebuilt meanwhile: the next add continues from its end
                    return
                slot.index.add(new_keys, new_values, stored=StoredKeys(keys, slot.base))
            slot.add_failed = ""
        except Exception as exc:  # the keys not added stay covered by the exact scan of the tail
            metrics.INDEX_FAILURES.labels(slot.kind, "add").inc()
            # not again at every Retrieve: once another batch of keys has arrived
            slot.add_retry_at = end + ADD_BATCH_TOKENS
            slot.add_failed = str(exc)
            log.exception("index add failed for session %s layer %d", session.session_id, layer)
        finally:
            slot.adding = False

    def queue_length(self) -> int:
        with self._queue_lock:
            return self._queued

    # -- spill and promote -----------------------------------------------------------------------------

    def export_blobs(self, session: Session) -> dict[int, bytes]:
        blobs = {}
        for layer, slot in enumerate(session.indexes):
            if slot is not None and slot.ready and slot.index is not None:
                header = json.dumps({"kind": slot.kind, "base": slot.base, "params": slot.params,
                                     "from_hints": slot.from_hints}).encode()
                blobs[layer] = _BLOB_HEADER.pack(len(header)) + header + slot.index.to_bytes()
        return blobs

    def import_blobs(self, session: Session, blobs: dict) -> None:
        for layer, blob in blobs.items():
            view = io.BytesIO(blob)
            (length,) = _BLOB_HEADER.unpack(view.read(_BLOB_HEADER.size))
            header = json.loads(view.read(length))
            shape = IndexShape(session.shape.num_kv_heads, session.shape.num_query_heads, session.shape.head_dim)
            try:
                index = index_class(header["kind"]).from_bytes(shape, header["params"], view.read())
            except Exception:
                log.exception("could not restore the index of session %s layer %s; it will be rebuilt",
                              session.session_id, layer)
                continue
            slot = LayerIndex(header["kind"], shape, header["params"], header["base"])
            slot.index, slot.ready, slot.from_hints = index, True, bool(header.get("from_hints", False))
            session.indexes[layer] = slot

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
