"""RetroAttention on the daemon side: earlier decode queries attend the keys that a Retrieve newly retrieved.

A Retrieve may carry P past queries per sequence (RetrieveRequest.past). After the current query's search,
past query p of sequence i attends, per query head h, the positions retrieved for (i, h) that it has not seen
yet: below its `seen_from` bound (it attended everything from there on through its device window) and not in
its `seen_ids`. The reply carries that partial attention (float32 output + log-sum-exp, -inf when nothing is
new); the client merges it into p's cached output by log-sum-exp, so the cached output stays equal to attention
over the union of every key set p has been shown. Only the retrieved keys count: the wave index's estimation
zone is not included. The past queries may travel stacked in RetrieveRequest.queries (past.stacked), and the
reply may hold all outputs and log-sum-exps in one tensor (past.packed -> RetrieveResponse.packed, `write_packed`):
fewer tensors to encode and decode per call, the integration's usual form.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit, prange

from kvd import gather_kernels, parallel
from kvd.errors import InvalidArgument
from kvd.gather_kernels import _widen_row, store_array
from kvd.validate import QUERY_DTYPES, check_dtype, check_finite, check_shape
from kvd.workers import run_claimed

if TYPE_CHECKING:
    from kvd.convert import TensorCodec
    from kvd.retrieval import SequenceResult
    from kvd.shm import OutputWriter
    from kvd.v1 import kvd_pb2 as pb

MAX_PAST = 64            # past queries per sequence
MAX_SEEN = 1 << 16       # seen ids per past query and head
ID_DTYPES = (torch.int32, torch.int64)


@dataclass
class PastQueries:
    queries: torch.Tensor             # float32 [n, P, Hq, d] once checked
    seen_ids: torch.Tensor | None     # int64 [n, P, Hq, S]
    seen_from: torch.Tensor | None    # int64 [n, P]
    packed: bool = False              # reply RetrieveResponse.packed (`write_packed`)
    rows: list[PastQueries] | None = field(default=None, repr=False, compare=False)  # `with_rows`

    def row(self, i: int) -> PastQueries:
        """Sequence i's past queries ([P, Hq, d], [P, Hq, S], [P])."""
        if self.rows is not None:
            return self.rows[i]
        return PastQueries(self.queries[i], None if self.seen_ids is None else self.seen_ids[i],
                           None if self.seen_from is None else self.seen_from[i], self.packed)

    def with_rows(self) -> PastQueries:
        """The same past queries with every sequence's row made once (a prepared Retrieve's, whose tensors are
        views of its slots: valid for every run)."""
        return replace(self, rows=[self.row(i) for i in range(self.queries.shape[0])])


def past_from_wire(codec: TensorCodec, message: pb.PastQueries, queries: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, PastQueries]:
    """The tensors of RetrieveRequest.past, as sent (checked later by `check_past`), and the current queries:
    `queries` (RetrieveRequest.queries) itself, or its last row when the past queries are stacked in it."""
    if message.stacked:
        if message.HasField("queries"):
            raise InvalidArgument("past.queries and past.stacked are exclusive")
        count = message.stacked
        if queries is None or queries.dim() != 4 or queries.shape[1] != count + 1:
            shape = None if queries is None else list(queries.shape)
            raise InvalidArgument(f"queries has shape {shape}, expected [n, {count + 1}, num_query_heads, head_dim] "
                                  f"with past.stacked = {count}")
        past_queries: torch.Tensor | None = queries[:, :count]
        queries = queries[:, count]
    else:
        past_queries = codec.read(message.queries, "past.queries")
    assert past_queries is not None
    seen_ids = codec.read(message.seen_ids, "past.seen_ids", required=False) if message.HasField("seen_ids") else None
    seen_from = (codec.read(message.seen_from, "past.seen_from", required=False) if message.HasField("seen_from")
                 else None)
    return queries, PastQueries(past_queries, seen_ids, seen_from, message.packed)


def check_past(past: PastQueries, sequences: int, heads: int, head_dim: int, finite: bool = True) -> PastQueries:
    """Validate shapes, dtypes and values (the caller checks the mode; `finite` False: it checked the queries'
    values too); returns float32 queries and int64 ids."""
    queries = past.queries
    check_dtype("past.queries", queries, QUERY_DTYPES)
    if queries.dim() != 4 or queries.shape[0] != sequences or not 1 <= queries.shape[1] <= MAX_PAST:
        raise InvalidArgument(f"past.queries has shape {list(queries.shape)}, expected [{sequences}, P, {heads}, "
                              f"{head_dim}] with 1 <= P <= {MAX_PAST}")
    count = queries.shape[1]
    check_shape("past.queries", queries, (sequences, count, heads, head_dim))
    if finite:
        check_finite("past.queries", queries)
    seen_ids = past.seen_ids
    if seen_ids is not None:
        check_dtype("past.seen_ids", seen_ids, ID_DTYPES)
        if seen_ids.dim() != 4 or tuple(seen_ids.shape[:3]) != (sequences, count, heads) \
                or seen_ids.shape[3] > MAX_SEEN:
            raise InvalidArgument(f"past.seen_ids has shape {list(seen_ids.shape)}, expected [{sequences}, {count}, "
                                  f"{heads}, S] with S <= {MAX_SEEN}")
        seen_ids = seen_ids.to(torch.int64)
    seen_from = past.seen_from
    if seen_from is not None:
        check_dtype("past.seen_from", seen_from, ID_DTYPES)
        check_shape("past.seen_from", seen_from, (sequences, count))
        seen_from = seen_from.to(torch.int64)
    return PastQueries(queries.float(), seen_ids, seen_from, past.packed)


def newly_seen(ids: torch.Tensor, count: int, seen_ids: torch.Tensor | None, seen_from: torch.Tensor | None
               ) -> torch.Tensor:
    """ids [Hq, m] (-1 = none) -> bool [P, Hq, m]: which of them past query p has not attended yet."""
    heads, m = ids.shape
    seen, bound = seen_arrays(count, heads, seen_ids, seen_from)
    out = np.empty((count, heads, m), np.bool_)
    _unseen(np.ascontiguousarray(ids.to(torch.int64).numpy()), seen, bound, out)
    return torch.from_numpy(out)


_NO_BOUND = (1 << 62)
_NEG_INF = -np.inf


def seen_arrays(count: int, heads: int, seen_ids: torch.Tensor | None, seen_from: torch.Tensor | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' seen ids [P, Hq, S] and bounds [P] (no seen ids, no bound where not given)."""
    seen = np.empty((count, heads, 0), np.int64) if seen_ids is None else np.ascontiguousarray(seen_ids.numpy())
    bound = np.full(count, _NO_BOUND, np.int64) if seen_from is None else np.ascontiguousarray(seen_from.numpy())
    return seen, bound


@njit(cache=True, nogil=True)
def _table_size(width: int) -> int:
    size = 16
    while size < 2 * width + 1:
        size *= 2
    return size


@njit(cache=True, nogil=True)
def _fill_table(table: np.ndarray, seen: np.ndarray) -> None:
    """An open-addressing hash set (size a power of two, -1 = free) of the ids >= 0 in seen (a sort of the seen
    ids costs several times more in torch)."""
    mask = table.shape[0] - 1
    table[:] = -1
    for j in range(seen.shape[0]):
        x = seen[j]
        if x < 0:
            continue
        i = (x * 2654435761) & mask
        while table[i] != -1 and table[i] != x:
            i = (i + 1) & mask
        table[i] = x


@njit(cache=True, nogil=True)
def _is_new(table: np.ndarray, x: int, bound: int) -> bool:
    """0 <= x < bound and x not in the hash set."""
    if not 0 <= x < bound:
        return False
    mask = table.shape[0] - 1
    i = (x * 2654435761) & mask
    while table[i] != -1:
        if table[i] == x:
            return False
        i = (i + 1) & mask
    return True


@njit(cache=True, nogil=True)
def _unseen(ids: np.ndarray, seen: np.ndarray, bound: np.ndarray, out: np.ndarray) -> None:
    """out[p, h, j] = 0 <= ids[h, j] < bound[p] and ids[h, j] not in seen[p, h, :]."""
    count, heads, width = seen.shape
    table = np.empty(_table_size(width), np.int64)
    for p in range(count):
        for h in range(heads):
            _fill_table(table, seen[p, h])
            for j in range(ids.shape[1]):
                out[p, h, j] = _is_new(table, ids[h, j], bound[p])


@njit(cache=True, nogil=True)
def past_scratch(threads: int, count: int, seen_width: int, m: int, d: int) -> tuple:
    """Per thread, the scratch of `attend_past_heads` for P = count past queries, `seen_width` seen ids each,
    m retrieved keys per head and head dim d: allocated once per region, not per head (every malloc inside a
    region contends for the daemon's few heap arenas)."""
    return (np.empty((threads, count, _table_size(seen_width)), np.int64),
            np.empty((threads, count, m), np.bool_),
            np.empty((threads, m), np.bool_),
            np.empty((threads, count + 1, m)),
            np.empty((threads, m), np.int64),
            np.empty((threads, count + 1)),
            np.empty((threads, count + 1)),
            np.empty((threads, count + 1, d), np.float32),
            np.empty((threads, d), np.float32))


@njit(cache=True, nogil=True)
def attend_rows_past_heads(kstore: np.ndarray, vstore: np.ndarray, ids: np.ndarray, scores: np.ndarray, scale: float,
                           group: int, past: np.ndarray, seen: np.ndarray, bound: np.ndarray, out: np.ndarray,
                           lse: np.ndarray, past_out: np.ndarray, past_lse: np.ndarray, h0: int, h1: int) -> float:
    """attend_past_heads with its own scratch (one range of heads per call)."""
    tables, new, wanted, weights, live, top, total, acc, row = past_scratch(1, past.shape[0], seen.shape[2],
                                                                            ids.shape[1], out.shape[1])
    return attend_past_heads(kstore, vstore, ids, scores, scale, group, past, seen, bound, out, lse, past_out,
                             past_lse, h0, h1, tables[0], new[0], wanted[0], weights[0], live[0], top[0], total[0],
                             acc[0], row[0])


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def attend_past_heads(kstore: np.ndarray, vstore: np.ndarray, ids: np.ndarray, scores: np.ndarray, scale: float,
                      group: int, past: np.ndarray, seen: np.ndarray, bound: np.ndarray, out: np.ndarray,
                      lse: np.ndarray, past_out: np.ndarray, past_lse: np.ndarray, h0: int, h1: int,
                      tables: np.ndarray, new: np.ndarray, wanted: np.ndarray, weights: np.ndarray, live: np.ndarray,
                      top: np.ndarray, total: np.ndarray, acc: np.ndarray, row: np.ndarray) -> float:
    """Query heads h0..h1-1 of gather_kernels._attend_rows (the current query: the same arithmetic, so the same
    bits) fused with the past queries' attention over their newly seen keys. Per head, each key row is read
    once for all past queries and each value row once for the current and all past queries. Heads are
    independent: disjoint head ranges may run at once (on threads: the kernel releases the GIL). The scratch
    (`past_scratch`, one thread's): seen-id tables, which keys are new to which past query, which key rows are
    read, weights (row 0: the current query; the past rows hold scaled scores first), the live positions, per
    query maximum and total, accumulators and a widened row.

    Rows scattered over a large store miss the caches; gathered again per past query, one miss at a time
    behind an exp and a branch each, they cost more than the attention itself. Here a first pass per head
    loads one element of every 64-byte line of its key and value rows (independent loads: the core overlaps
    those misses; the key pass that follows once interleaved them with its arithmetic, which kept fewer in
    flight: 0.72 -> 0.50 ms for 32 heads x 100 cold rows), every weight is computed before the value pass, and
    that pass visits only the rows some query weighs. Returns the sum of those loads (so that they are kept)."""
    m = ids.shape[1]
    d = out.shape[1]
    count = past.shape[0]
    line = 64 // vstore.itemsize
    touched = 0.0
    for h in range(h0, h1):
        kv = h // group
        for q in range(count + 1):
            top[q] = _NEG_INF
            total[q] = 0.0
        for p in range(count):
            _fill_table(tables[p], seen[p, h])
        # every line of the rows this head may read, first: independent loads, overlapped. Value rows of all
        # the retrieved keys; key rows only where some past query has not seen the key (the current query's
        # scores come with the call, and consecutive steps retrieve mostly the same keys)
        for j in range(m):
            key = ids[h, j]
            fresh = False
            for p in range(count):
                new[p, j] = key >= 0 and _is_new(tables[p], key, bound[p])
                fresh = fresh or new[p, j]
            wanted[j] = fresh
        for j in range(m):  # loads only, nothing else in the loop: as many misses in flight as the core allows
            key = ids[h, j]
            if key >= 0:
                for c in range(0, d, line):
                    touched += vstore[kv, key, c]
                if wanted[j]:
                    for c in range(0, d, line):
                        touched += kstore[kv, key, c]
        for j in range(m):
            key = ids[h, j]
            if key < 0:
                continue
            if scores[h, j] * scale > top[0]:
                top[0] = scores[h, j] * scale
            fresh = False
            for p in range(count):
                fresh = fresh or new[p, j]
            if not fresh:
                continue
            _widen_row(kstore[kv, key], row)
            for p in range(count):
                if new[p, j]:
                    acc_p = np.float32(0.0)
                    for c in range(d):
                        acc_p += row[c] * past[p, h, c]
                    weights[p + 1, j] = acc_p * scale
                    if acc_p * scale > top[p + 1]:
                        top[p + 1] = acc_p * scale
        nlive = 0
        for j in range(m):
            valid = ids[h, j] >= 0 and top[0] != _NEG_INF
            weight = math.exp(scores[h, j] * scale - top[0]) if valid else 0.0
            weights[0, j] = weight
            used = weight != 0.0
            for p in range(count):
                weight = math.exp(weights[p + 1, j] - top[p + 1]) if new[p, j] else 0.0
                weights[p + 1, j] = weight
                used = used or weight != 0.0
            if used:
                live[nlive] = j
                nlive += 1
        acc[:] = 0.0
        for i in range(nlive):
            j = live[i]
            _widen_row(vstore[kv, ids[h, j]], row)
            for q in range(count + 1):
                weight = weights[q, j]
                if weight != 0.0:
                    total[q] += weight
                    weight32 = np.float32(weight)
                    for c in range(d):
                        acc[q, c] += weight32 * row[c]
        if top[0] == _NEG_INF:
            lse[h] = _NEG_INF
            out[h, :] = 0.0
        else:
            inv = np.float32(1.0 / total[0])
            for c in range(d):
                out[h, c] = acc[0, c] * inv
            lse[h] = top[0] + math.log(total[0])
        for p in range(count):
            if top[p + 1] == _NEG_INF:
                past_lse[p, h] = _NEG_INF
                past_out[p, h, :] = 0.0
                continue
            inv = np.float32(1.0 / total[p + 1])
            for c in range(d):
                past_out[p, h, c] = acc[p + 1, c] * inv
            past_lse[p, h] = top[p + 1] + math.log(total[p + 1])
    return touched


@njit(cache=True, nogil=True, parallel=True)
def _attend_rows_past_parallel(kstore: np.ndarray, vstore: np.ndarray, ids: np.ndarray, scores: np.ndarray,
                               scale: float, group: int, past: np.ndarray, seen: np.ndarray, bound: np.ndarray,
                               out: np.ndarray, lse: np.ndarray, past_out: np.ndarray, past_lse: np.ndarray,
                               parts: int) -> None:
    """The heads in `parts` contiguous ranges (one per thread: the kernel's scratch is allocated once per
    range, and every malloc in a region contends for the daemon's few heap arenas)."""
    heads = ids.shape[0]
    for part in prange(parts):
        attend_rows_past_heads(kstore, vstore, ids, scores, scale, group, past, seen, bound, out, lse, past_out,
                          past_lse, heads * part // parts, heads * (part + 1) // parts)


def fused(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `attend_rows_past` takes these stores (bf16/fp32: the compiled row kernels' stores)."""
    return gather_kernels.supported(keys) and gather_kernels.supported(values)


def attend_rows_past(keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                     scale: float, past: PastQueries, threads: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The current query's partial attention (as gather_kernels.attend_rows) and the past queries' over their
    newly seen keys, in one pass over the retrieved rows.

    keys, values [Hkv, L, d] (`fused` stores); ids [Hq, m] (this call's retrieval, -1 padded) with the current
    query's exact scores [Hq, m]; past: one sequence's [P, Hq, d], [P, Hq, S], [P]. Returns output [Hq, d],
    lse [Hq], past output [P, Hq, d] (zeros where nothing is new) and past lse [P, Hq] (-inf there).
    `threads`: the query heads are shared by that many threads (default: every core, in one parallel region
    where kvd.parallel allows it, else `threads_for` worker-pool threads); the results do not depend on it."""
    count, heads, dim = past.queries.shape
    seen, bound = seen_arrays(count, heads, past.seen_ids, past.seen_from)
    out = np.empty((heads, dim), np.float32)
    lse = np.empty(heads, np.float32)
    past_out = np.empty((count, heads, dim), np.float32)
    past_lse = np.empty((count, heads), np.float32)
    args = (store_array(keys), store_array(values), np.ascontiguousarray(ids.numpy()),
            np.ascontiguousarray(scores.float().numpy()), float(scale), heads // values.shape[0],
            np.ascontiguousarray(past.queries.numpy()), seen, bound, out, lse, past_out, past_lse)
    if parallel.enabled() and (threads or 0) != 1 and heads * ids.shape[1] * (count + 1) >= 2 * WORK_PER_THREAD:
        team = parallel.threads(threads or 0, limit=heads)  # a region's threads start within microseconds: all help
        with parallel.timed():
            _attend_rows_past_parallel(*args, team)
        return torch.from_numpy(out), torch.from_numpy(lse), torch.from_numpy(past_out), torch.from_numpy(past_lse)
    if threads is None:
        threads = threads_for(heads, ids.shape[1], count)
    if threads <= 1:
        attend_rows_past_heads(*args, 0, heads)
    else:
        share_ranges(lambda h0, h1: attend_rows_past_heads(*args, h0, h1), heads, threads)
    return torch.from_numpy(out), torch.from_numpy(lse), torch.from_numpy(past_out), torch.from_numpy(past_lse)


WORK_PER_THREAD = 1024  # (head, row, query) triples per thread at least: a hand-off costs ~10-30 us
HEADS_PER_CHUNK = 4     # heads per claimed range (a kernel call costs ~2 us)
MAX_THREADS = 4         # H100 host (16 cores), 32 heads x 100 cold rows, P=1: 1.10 / 0.88 / 0.75 / 0.93 / 0.94 ms
#                         on 1 / 2 / 4 / 6 / 8 threads (bench/retro_call_bench.py --kernel)


def max_threads() -> int:
    """Threads a fused call may use: $KVD_RETRO_THREADS, else MAX_THREADS and at most half the cores (the other
    half serve the gRPC threads, the searches of other calls and, on the same host, the client): 1 on a
    2-core machine."""
    env = os.environ.get("KVD_RETRO_THREADS", "")
    return max(1, int(env) if env.isdigit() else min(MAX_THREADS, parallel.CORES // 2))


def threads_for(heads: int, rows: int, count: int) -> int:
    """Threads for the fused kernel: one per WORK_PER_THREAD (head, row, query) triples, at most `max_threads`
    (the 8B decode shape, 32 heads x 100 rows x 2 queries on 16 cores: 4)."""
    return max(1, min(_MAX_THREADS, heads, heads * rows * (count + 1) // WORK_PER_THREAD))


_MAX_THREADS = max_threads()


def share_ranges(fn: Callable[[int, int], None], total: int, threads: int) -> None:
    """fn(lo, hi) over contiguous ranges of 0..total-1 (HEADS_PER_CHUNK long), claimed one at a time by the
    calling thread and up to threads - 1 helpers (kvd.workers.run_claimed)."""
    chunks = min(total, max(threads, -(-total // HEADS_PER_CHUNK)))
    run_claimed(fn, total, threads, "retro", chunks=chunks)


def warmup() -> None:
    """Compile (or load from the numba cache) the kernels of past queries: ~1 s on the first one otherwise."""
    newly_seen(torch.tensor([[0, 1]]), 1, torch.tensor([[[0]]]), torch.tensor([2]))
    ids = torch.tensor([[0, 1, -1], [1, -1, -1]])
    past = PastQueries(torch.ones(2, 2, 4), torch.tensor([[[0], [1]], [[-1], [-1]]]), torch.tensor([2, 1]))
    for dtype in (torch.bfloat16, torch.float32):
        # a session's store is a prefix view of a larger buffer: the kernel gets that buffer (store_array), which
        # is the layout compiled here
        store = torch.ones(2, 3, 4, dtype=dtype)[:, :2]
        attend_rows_past(store, store, ids, torch.ones(2, 3), 1.0, past, threads=1)
        if parallel.enabled():  # the parallel region of decode-sized calls
            many = torch.zeros(2, WORK_PER_THREAD, dtype=torch.int64)
            attend_rows_past(store, store, many, torch.ones(many.shape), 1.0, past, threads=2)


def attend_past(keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, past: PastQueries, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of P past queries over their newly seen keys, in float32, with torch ops (stores that
    `fused` does not take).

    keys, values [Hkv, L, d]; ids [Hq, m] (this call's retrieval, -1 padded); past: one sequence's queries
    float32 [P, Hq, d], seen ids [P, Hq, S] and bounds [P]. Returns output [P, Hq, d] (zeros where nothing is
    new) and lse [P, Hq] (-inf there)."""
    queries = past.queries
    count, heads, dim = queries.shape
    new = newly_seen(ids, count, past.seen_ids, past.seen_from)
    if not bool(new.any()):
        return torch.zeros(count, heads, dim), torch.full((count, heads), float("-inf"))
    kv_head = (torch.arange(heads) // (heads // keys.shape[0])).unsqueeze(1)
    rows = ids.clamp(min=0)
    scores = torch.einsum("phd,hmd->phm", queries, keys[kv_head, rows].float()) * scale
    scores = scores.masked_fill_(~new, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    probs = torch.where(new, probs, torch.zeros_like(probs))
    out = torch.einsum("phm,hmd->phd", probs, values[kv_head, rows].float())
    return out, lse


def _packed_of(result: SequenceResult) -> torch.Tensor:
    """A sequence's [P + 1, Hq, d + 1] block of RetrieveResponse.packed: ~33 KB for 32 heads, assembled unless
    the kernel wrote it as such (the graph's fused region)."""
    if result.packed is not None:
        return result.packed
    assert result.output is not None and result.past_output is not None
    block = torch.empty(result.past_output.shape[0] + 1, result.output.shape[0], result.output.shape[-1] + 1)
    fill_packed(result, block)
    return block


def fill_packed(result: SequenceResult, block: torch.Tensor) -> None:
    """Write a sequence's results into its [P + 1, Hq, d + 1] block of a packed reply (past rows, then the current
    query's; log-sum-exp in the last column)."""
    out, lse, past_out, past_lse = result.output, result.lse, result.past_output, result.past_lse
    assert out is not None and lse is not None and past_out is not None and past_lse is not None
    count, dim = past_out.shape[0], out.shape[-1]
    block[count, :, :dim] = out
    block[count, :, dim] = lse
    block[:count, :, :dim] = past_out
    block[:count, :, dim] = past_lse


def write_packed(codec: TensorCodec, writer: OutputWriter | None, results: list[SequenceResult],
                 reply: pb.RetrieveResponse) -> None:
    """RetrieveResponse.packed (past.packed): the outputs and log-sum-exps of the past and current queries in one
    tensor, which the client copies to its device at once."""
    codec.write_sequences(writer, [_packed_of(r) for r in results], reply.packed)


def write_past(codec: TensorCodec, writer: OutputWriter | None, results: list[SequenceResult],
               reply: pb.RetrieveResponse) -> None:
    codec.write_sequences(writer, [r.past_output for r in results], reply.past_output)  # type: ignore[misc]
    codec.write_sequences(writer, [r.past_lse for r in results], reply.past_lse)  # type: ignore[misc]
