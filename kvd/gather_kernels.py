"""Compiled per-call kernels of the retrieval path: exact float32 scores of chosen keys, and softmax attention
over chosen values, read straight from the session's 16-bit (bf16) or float32 store.

Why: the same work in torch (advanced-index gather of [Hq, k, d] rows, a bf16->float32 copy, a batched product,
logsumexp, a second gather and product) costs a dozen small ops per call, ~3 ms on 2 cores for 32 heads x 100
keys; these loops read each chosen row once and need ~0.1-0.3 ms. bf16 is widened by moving its bits into the
top half of a float32, exactly. fp16 stores have no cheap exact widening here and keep the torch path
(`supported` says which stores the kernels take). A decode-sized attention runs its heads as one parallel
region (kvd.parallel) where the host allows it, else on a few worker-pool threads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from kvd import parallel
from kvd.workers import run_claimed

_NEG_INF = -np.inf


def supported(store: torch.Tensor) -> bool:
    """bf16 or float32 with contiguous rows (a session's store is a prefix view of a larger buffer)."""
    return store.dtype in (torch.bfloat16, torch.float32) and store.dim() == 3 and store.stride(-1) == 1


def store_array(store: torch.Tensor) -> np.ndarray:
    """The store [Hkv, n, d] as the kernels read it: bf16 as its uint16 bit patterns (widened in the kernels),
    float32 as is. A session's store is a prefix view of a larger [Hkv, capacity, d] buffer; the whole buffer is
    exposed instead (no copy; rows past n are never read), because numba compiles a non-contiguous array into
    strided loops: an exact scan took 1.8x and an attention over chosen rows 2x as long (2 cores, 32K keys)."""
    hkv, _, d = store.shape
    if not store.is_contiguous() and store.stride(2) == 1 and store.stride(1) == d and store.stride(0) % d == 0:
        rows = store.stride(0) // d
        if store.storage_offset() + hkv * rows * d <= store.untyped_storage().nbytes() // store.element_size():
            store = store.as_strided((hkv, rows, d), (rows * d, d, 1))
    if store.dtype == torch.bfloat16:
        return store.view(torch.int16).numpy().view(np.uint16)
    return store.numpy()


def _widen_row(row: np.ndarray, out: np.ndarray) -> None:
    """out[:] = row as float32; row is uint16 (bf16 bits) or float32 (compiled per type by the overload)."""
    out[:] = row


@overload(_widen_row, inline="always")
def _widen_row_typed(row, out):  # numba typing hook: the implementations' signatures must match it
    if row.dtype == types.uint16:
        def widen_bf16(row, out):
            bits = out.view(np.uint32)
            for j in range(row.shape[0]):
                bits[j] = np.uint32(row[j]) << 16
        return widen_bf16

    def widen_f32(row, out):
        for j in range(row.shape[0]):
            out[j] = row[j]
    return widen_f32


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _score_rows(store: np.ndarray, queries: np.ndarray, ids: np.ndarray, group: int, out: np.ndarray) -> None:
    num_query_heads, m = ids.shape
    d = queries.shape[1]
    for h in range(num_query_heads):
        row = np.empty(d, np.float32)
        kv = h // group
        for j in range(m):
            key = ids[h, j]
            if key < 0:
                out[h, j] = _NEG_INF
                continue
            _widen_row(store[kv, key], row)
            acc = np.float32(0.0)
            for c in range(d):
                acc += row[c] * queries[h, c]
            out[h, j] = acc


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def attend_head(rows: np.ndarray, ids: np.ndarray, scores: np.ndarray, scale: float, weights: np.ndarray,
                row: np.ndarray, out: np.ndarray) -> float:
    """Softmax(scale * scores) over rows [n, d] at ids [m] (-1 ignored) into out [d]; returns the log-sum-exp
    (-inf, out 0 when no id is valid). Scratch: weights float64 [>= m], row float32 [d]. Not inlined on
    purpose: callers compiled with full fastmath (no infinities) would fold away the -inf checks."""
    # The weights come first: with an exp and a branch on it between two rows, their cache misses (rows
    # scattered over a large store) were taken one after another; the value pass alone overlaps them.
    m = ids.shape[0]
    d = out.shape[0]
    top = _NEG_INF
    for j in range(m):
        if ids[j] >= 0 and scores[j] * scale > top:
            top = scores[j] * scale
    for c in range(d):
        out[c] = 0.0
    if top == _NEG_INF:
        return _NEG_INF
    for j in range(m):
        weights[j] = math.exp(scores[j] * scale - top) if ids[j] >= 0 else 0.0
    total = 0.0
    for j in range(m):
        weight = weights[j]
        if weight == 0.0:
            continue
        total += weight
        _widen_row(rows[ids[j]], row)
        for c in range(d):
            out[c] += np.float32(weight) * row[c]
    inv = 1.0 / total
    for c in range(d):
        out[c] *= np.float32(inv)
    return top + math.log(total)


@njit(cache=True, nogil=True)
def _attend_rows(store: np.ndarray, ids: np.ndarray, scores: np.ndarray, scale: float, group: int,
                 out: np.ndarray, lse: np.ndarray, h0: int, h1: int) -> None:
    """Query heads h0..h1-1 (callers split the heads over threads)."""
    weights = np.empty(ids.shape[1])
    row = np.empty(out.shape[1], np.float32)
    for h in range(h0, h1):
        lse[h] = attend_head(store[h // group], ids[h], scores[h], scale, weights, row, out[h])


@njit(cache=True, nogil=True, parallel=True)
def _attend_rows_parallel(store: np.ndarray, ids: np.ndarray, scores: np.ndarray, scale: float, group: int,
                          out: np.ndarray, lse: np.ndarray, parts: int) -> None:
    """The heads in `parts` contiguous ranges, one per thread (scratch allocated once per range)."""
    heads = ids.shape[0]
    for part in prange(parts):
        _attend_rows(store, ids, scores, scale, group, out, lse, heads * part // parts, heads * (part + 1) // parts)


# Value rows are scattered over a large store (a cache miss each): a decode-sized call (32 heads x 100 rows)
# is split over threads; small calls stay on the caller, where a hand-off would cost more than it saves.
# Worker-pool hand-offs cost ~10-50 us each, so the pool gets a few chunks; a parallel region, every core.
_ATTEND_CHUNKS = 4
_ROWS_PER_CHUNK = 512


def score_rows(keys: torch.Tensor, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exact float32 q.k for keys [Hkv, n, d] at ids [Hq, m] (-1: -inf); queries [Hq, d] -> [Hq, m]."""
    group = queries.shape[0] // keys.shape[0]
    out = np.empty(tuple(ids.shape), np.float32)
    q = np.ascontiguousarray(queries.float().numpy())
    _score_rows(store_array(keys), q, np.ascontiguousarray(ids.numpy()), group, out)
    return torch.from_numpy(out)


def attend_rows(values: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, scale: float, threads: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax(scale * scores) over values [Hkv, n, d] at ids [Hq, m] (-1 ignored) -> output float32 [Hq, d],
    lse [Hq] (lse -inf and output 0 for a head without keys). Equals kvd_client.attention_from_scores.
    threads: a parallel region's size (0: one per core, at most one per head)."""
    num_query_heads = ids.shape[0]
    group = num_query_heads // values.shape[0]
    out = np.empty((num_query_heads, values.shape[2]), np.float32)
    lse = np.empty(num_query_heads, np.float32)
    store, id_rows = store_array(values), np.ascontiguousarray(ids.numpy())
    score_rows = np.ascontiguousarray(scores.float().numpy())
    chunks = min(_ATTEND_CHUNKS, max(1, ids.numel() // _ROWS_PER_CHUNK))
    if chunks > 1 and parallel.enabled():
        team = parallel.threads(threads, limit=num_query_heads)
        with parallel.timed():
            _attend_rows_parallel(store, id_rows, score_rows, float(scale), group, out, lse, team)
        return torch.from_numpy(out), torch.from_numpy(lse)
    run_claimed(lambda h0, h1: _attend_rows(store, id_rows, score_rows, float(scale), group, out, lse, h0, h1),
                num_query_heads, chunks, "search", chunks=chunks)
    return torch.from_numpy(out), torch.from_numpy(lse)


def warmup() -> None:
    """Compile (or load from the numba cache) both kernels for bf16 and float32 stores."""
    ids = torch.tensor([[0, 1, -1]])
    queries = torch.ones(1, 4)
    for dtype in (torch.bfloat16, torch.float32):
        store = torch.ones(1, 2, 4, dtype=dtype)
        attend_rows(store, ids, score_rows(store, queries, ids), 1.0)
        if parallel.enabled():  # the parallel region of decode-sized calls
            many = torch.zeros(1, _ROWS_PER_CHUNK * 2, dtype=torch.int64)
            attend_rows(store, many, torch.ones(many.shape), 1.0)
