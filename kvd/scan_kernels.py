"""The exact scan as one compiled pass (numba, nogil): float32 q.k of every key straight from the bf16/fp32
session store, a top-k heap per query head, no float32 copy of the keys and no candidate rescoring.

A task is one KV head over one range of keys: the key row is widened once and scored against the group's
query heads while it is in cache, so each key is read from memory once per call. Tasks are claimed by the
search threads; their per-task top-k lists are merged at the end. Memory-bound: one pass over the layer's
keys (at 128K tokens, 8 KV heads and head dim 128: 256 MiB of bf16).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kvd import parallel
from kvd.gather_kernels import _widen_row, store_array
from kvd.index.graph_kernels import _pop, _prefetch_row, _push
from kvd.workers import run_claimed

_NEG_INF = np.float32(-np.inf)
# A task scans at least this many keys (smaller scans are not worth a thread hand-off)...
_MIN_TASK_KEYS = 8192
# ...and the whole call runs on the caller below this many key rows (all KV heads together).
_MIN_PARALLEL_ROWS = 32768
# The same two in a parallel region (kvd.parallel), whose threads take a task within microseconds.
_MIN_TASK_KEYS_REGION = 256
_MIN_PARALLEL_ROWS_REGION = 2048
# Candidate scoring: at most this many head chunks (threads), each worth at least this many candidate rows.
_CANDIDATE_CHUNKS = 8
_MIN_CANDIDATE_ROWS = 2048
_PREFETCH_AHEAD = 16


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _scan_range(store: np.ndarray, queries: np.ndarray, kv: int, lo: int, hi: int, heap_scores: np.ndarray,
                heap_ids: np.ndarray) -> None:
    """Top-k of keys lo..hi-1 of KV head kv for each query head of its group: heap_scores/heap_ids [group, k]
    (filled with -inf / -1 where fewer than k keys exist; in heap order, not sorted)."""
    group, k = heap_scores.shape
    d = queries.shape[1]
    row = np.empty(d, np.float32)
    sizes = np.zeros(group, np.int64)
    for key in range(lo, hi):
        _widen_row(store[kv, key], row)
        for g in range(group):
            h = kv * group + g
            acc = np.float32(0.0)
            for c in range(d):
                acc += row[c] * queries[h, c]
            size = sizes[g]
            if size < k:
                sizes[g] = _push(heap_scores[g], heap_ids[g], size, acc, key)
            elif acc > heap_scores[g, 0]:
                _pop(heap_scores[g], heap_ids[g], k)
                _push(heap_scores[g], heap_ids[g], k - 1, acc, key)
    for g in range(group):
        for j in range(sizes[g], k):
            heap_scores[g, j] = _NEG_INF
            heap_ids[g, j] = -1


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _candidate_heads(store: np.ndarray, queries: np.ndarray, candidates: np.ndarray, group: int, begin: int,
                     end: int, heap_scores: np.ndarray, heap_ids: np.ndarray, h0: int, h1: int) -> None:
    """Query heads h0..h1-1: the top-k of their candidate positions in [begin, end) (a repeated one once), in
    heap order; the rows are read in position order."""
    k = heap_scores.shape[1]
    d = queries.shape[1]
    row = np.empty(d, np.float32)
    for h in range(h0, h1):
        kv = h // group
        ids = np.sort(candidates[h])
        rows = store[kv]
        size = 0
        previous = -1
        for j in range(min(_PREFETCH_AHEAD, ids.shape[0])):
            if ids[j] >= 0:
                _prefetch_row(rows, ids[j])
        for j in range(ids.shape[0]):
            if j + _PREFETCH_AHEAD < ids.shape[0] and ids[j + _PREFETCH_AHEAD] >= 0:
                _prefetch_row(rows, ids[j + _PREFETCH_AHEAD])  # scattered rows: request them early
            key = ids[j]
            if key < begin or key >= end or key == previous:
                continue
            previous = key
            _widen_row(store[kv, key], row)
            acc = np.float32(0.0)
            for c in range(d):
                acc += row[c] * queries[h, c]
            if size < k:
                size = _push(heap_scores[h], heap_ids[h], size, acc, key)
            elif acc > heap_scores[h, 0]:
                _pop(heap_scores[h], heap_ids[h], k)
                _push(heap_scores[h], heap_ids[h], k - 1, acc, key)
        for j in range(size, k):
            heap_scores[h, j] = _NEG_INF
            heap_ids[h, j] = -1


@njit(cache=True, nogil=True, parallel=True)
def _scan_tasks_parallel(store: np.ndarray, queries: np.ndarray, bounds: np.ndarray, heap_scores: np.ndarray,
                         heap_ids: np.ndarray) -> None:
    """Every (KV head, key range) task of scan_topk as one parallel region; heaps [Hkv, chunks, group, k]."""
    chunks = heap_scores.shape[1]
    for task in prange(heap_scores.shape[0] * chunks):
        kv = task // chunks
        c = task - kv * chunks
        _scan_range(store, queries, kv, bounds[c], bounds[c + 1], heap_scores[kv, c], heap_ids[kv, c])


@njit(cache=True, nogil=True, parallel=True)
def _candidate_heads_parallel(store: np.ndarray, queries: np.ndarray, candidates: np.ndarray, group: int,
                              begin: int, end: int, heap_scores: np.ndarray, heap_ids: np.ndarray) -> None:
    for h in prange(candidates.shape[0]):
        _candidate_heads(store, queries, candidates, group, begin, end, heap_scores, heap_ids, h, h + 1)


def candidate_topk(queries: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, k: int, begin: int,
                   end: int, threads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of given positions by exact float32 q.k over a bf16/fp32 store [Hkv, n, d]: candidates int64
    [Hq, C] (-1 = none; outside [begin, end) left out; a repeated one counts once) -> (ids [Hq, min(k, C)]
    by decreasing score, -1 padded; scores, -inf padded). Query heads are shared by the search threads (a
    parallel region of `threads`, 0 = one per core)."""
    num_query_heads, count = candidates.shape[0], min(k, candidates.shape[1])
    heap_scores = np.empty((num_query_heads, count), np.float32)
    heap_ids = np.empty((num_query_heads, count), np.int64)
    store, q = store_array(keys), np.ascontiguousarray(queries.float().numpy())
    cand = np.ascontiguousarray(candidates.numpy())
    group = num_query_heads // keys.shape[0]
    chunks = max(1, min(_CANDIDATE_CHUNKS, candidates.numel() // _MIN_CANDIDATE_ROWS))
    if chunks > 1 and parallel.enabled():
        parallel.threads(threads, limit=num_query_heads)
        with parallel.timed():
            _candidate_heads_parallel(store, q, cand, group, begin, end, heap_scores, heap_ids)
    else:
        run_claimed(lambda h0, h1: _candidate_heads(store, q, cand, group, begin, end, heap_scores, heap_ids, h0, h1),
                    num_query_heads, chunks, "search", chunks=chunks)
    top, order = torch.sort(torch.from_numpy(heap_scores), dim=1, descending=True)
    return torch.gather(torch.from_numpy(heap_ids), 1, order), top


def scan_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, begin: int, end: int, threads: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by float32 q.k over keys [begin, end) of a bf16/fp32 store [Hkv, n, d] (stride(-1) == 1):
    queries [Hq, d] -> (ids int64 [Hq, k'] absolute, scores float32 [Hq, k']) by decreasing score,
    k' = min(k, end - begin). threads: a parallel region's size (0 = one per core)."""
    num_kv_heads = keys.shape[0]
    num_query_heads = queries.shape[0]
    group = num_query_heads // num_kv_heads
    n = end - begin
    count = min(k, n)
    workers = parallel.CORES
    rows = n * num_kv_heads
    region = parallel.enabled()
    min_rows, min_task = (_MIN_PARALLEL_ROWS_REGION, _MIN_TASK_KEYS_REGION) if region else \
        (_MIN_PARALLEL_ROWS, _MIN_TASK_KEYS)
    chunks = 1 if rows < min_rows else max(1, min(n // min_task, -(-2 * workers // num_kv_heads)))
    bounds = [begin + n * c // chunks for c in range(chunks + 1)]
    heap_scores = np.empty((num_kv_heads, chunks, group, count), np.float32)
    heap_ids = np.empty((num_kv_heads, chunks, group, count), np.int64)
    store = store_array(keys)
    q = np.ascontiguousarray(queries.float().numpy())

    def tasks(t0: int, t1: int) -> None:
        for task in range(t0, t1):
            kv, c = divmod(task, chunks)
            _scan_range(store, q, kv, bounds[c], bounds[c + 1], heap_scores[kv, c], heap_ids[kv, c])

    total = num_kv_heads * chunks
    if region and rows >= min_rows and total > 1:
        parallel.threads(threads, limit=total)
        with parallel.timed():
            _scan_tasks_parallel(store, q, np.array(bounds, np.int64), heap_scores, heap_ids)
    else:
        run_claimed(tasks, total, 1 if rows < min_rows else min(total, workers), "search")
    # [Hkv, chunks, group, count] -> [Hq, chunks * count], then the k best of every query head
    scores = torch.from_numpy(heap_scores).permute(0, 2, 1, 3).reshape(num_query_heads, chunks * count)
    ids = torch.from_numpy(heap_ids).permute(0, 2, 1, 3).reshape(num_query_heads, chunks * count)
    top, order = torch.topk(scores, count, dim=1)
    return torch.gather(ids, 1, order), top


def warmup() -> None:
    """Compile (or load from the numba cache) the scan for bf16 and float32 stores."""
    queries = torch.ones(2, 4)
    for dtype in (torch.bfloat16, torch.float32):
        scan_topk(queries, torch.ones(1, 8, 4, dtype=dtype), 3, 0, 8)
        candidate_topk(queries, torch.ones(1, 8, 4, dtype=dtype), torch.tensor([[1, 1, -1], [7, 2, 3]]), 2, 0, 8)
        if parallel.enabled():  # the parallel regions of larger calls
            scan_topk(queries, torch.ones(1, _MIN_PARALLEL_ROWS_REGION, 4, dtype=dtype), 3, 0,
                      _MIN_PARALLEL_ROWS_REGION)
            many = torch.zeros(2, _MIN_CANDIDATE_ROWS, dtype=torch.int64)
            candidate_topk(queries, torch.ones(1, 8, 4, dtype=dtype), many, 2, 0, 8)
