"""Compiled kernels (numba, nogil, serial) of the attention-aware graph index: beam search and construction.

A graph is a padded adjacency int32 [capacity, W] whose rows are left-packed (-1 after the last neighbour).
Search maximizes the inner product q.k; construction measures keys against each other by squared L2.
Every kernel is serial and releases the GIL; callers parallelize by running index ranges in Python threads
(numba's own parallel layer is avoided on purpose: its default workqueue layer must not be entered from
several threads at once, and the daemon searches and builds from different threads).
Keys may be float32 or bf16 bit patterns (uint16, widened exactly in the distance loops): every kernel is
compiled for the key type it is given.
Compiled on first use and cached on disk (numba cache=True; NUMBA_CACHE_DIR overrides the location).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.extending import intrinsic, overload

from kvd.gather_kernels import attend_head
from kvd.retro import attend_past_heads

_INF = np.float32(np.inf)
MAX_EXPAND = 8  # search param 'expand': frontier candidates taken per step, at most


@intrinsic
def _bits_to_f32(typingctx, bits):  # numba typing hook: reinterpret uint32 bits as float32
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _prefetch_at(typingctx, arr, row, offset):  # numba typing hook: prefetch byte `offset` of arr[row] (2-D)
    def codegen(context, builder, signature, args):
        array_type, row_type, offset_type = signature.args
        array = context.make_array(array_type)(context, builder, args[0])
        row_index = context.cast(builder, args[1], row_type, types.intp)
        byte = context.cast(builder, args[2], offset_type, types.intp)
        stride = builder.extract_value(array.strides, 0)
        address = builder.add(builder.ptrtoint(array.data, ir.IntType(64)),
                              builder.add(builder.mul(row_index, stride), byte))
        i32 = ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]))
        # read access, high temporal locality, data cache
        builder.call(prefetch, [builder.inttoptr(address, ir.IntType(8).as_pointer()), ir.Constant(i32, 0),
                                ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, row, offset), codegen


@njit(cache=True, nogil=True, inline="always")
def _prefetch_row(arr: np.ndarray, row: int) -> None:
    """Ask for every cache line of arr[row] ahead of use: graph searches jump between rows far apart."""
    for byte in range(0, arr.shape[1] * arr.itemsize, 64):
        _prefetch_at(arr, row, byte)


def _widen(x):  # compiled per element type by the overload below
    return x


@overload(_widen, inline="always")
def _widen_typed(x):  # numba typing hook: bf16 bit patterns (uint16) -> float32, floats unchanged
    if isinstance(x, types.Integer) and x.bitwidth == 16 and not x.signed:
        return lambda x: _bits_to_f32(np.uint32(x) << np.uint32(16))
    return lambda x: x


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _dot(a: np.ndarray, b: np.ndarray) -> np.float32:
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += _widen(a[i]) * _widen(b[i])
    return s


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _sqdist(a: np.ndarray, b: np.ndarray) -> np.float32:
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        t = _widen(a[i]) - _widen(b[i])
        s += t * t
    return s


@njit(cache=True, nogil=True, inline="always")
def _push(hd: np.ndarray, hi: np.ndarray, size: int, d: np.float32, i: int) -> int:
    """Push onto a binary min-heap (keys hd, payload hi); returns the new size."""
    pos = size
    hd[pos] = d
    hi[pos] = i
    while pos > 0:
        parent = (pos - 1) >> 1
        if hd[parent] <= hd[pos]:
            break
        hd[parent], hd[pos] = hd[pos], hd[parent]
        hi[parent], hi[pos] = hi[pos], hi[parent]
        pos = parent
    return size + 1


@njit(cache=True, nogil=True, inline="always")
def _pop(hd: np.ndarray, hi: np.ndarray, size: int) -> int:
    """Remove the minimum of a binary min-heap; returns the new size."""
    size -= 1
    hd[0] = hd[size]
    hi[0] = hi[size]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and hd[child + 1] < hd[child]:
            child += 1
        if hd[child] >= hd[pos]:
            break
        hd[child], hd[pos] = hd[pos], hd[child]
        hi[child], hi[pos] = hi[pos], hi[child]
        pos = child
    return size


# ------------------------------------------------------------------------------------------------ search


def visited_words(count: int) -> int:
    """uint64 words of a visited bitset over `count` nodes (plain Python: a search's scratch check calls it per
    Retrieve, where a compiled call's dispatch would cost more than the sum; kernels use _visited_words)."""
    return (count + 63) >> 6


_visited_words = njit(cache=True, nogil=True, inline="always")(visited_words)


@njit(cache=True, nogil=True, inline="always")
def _first_visit(visited: np.ndarray, node: int) -> bool:
    """Mark node visited in the bitset; whether it was not visited before."""
    word = node >> 6
    bit = np.uint64(1) << np.uint64(node & 63)
    if visited[word] & bit:
        return False
    visited[word] |= bit
    return True


@njit(cache=True, nogil=True, inline="always")
def _clear_visited(visited: np.ndarray, limit: int) -> None:
    visited[:_visited_words(limit)] = 0


@njit(cache=True, nogil=True, inline="always")
def _fresh_neighbours(keys: np.ndarray, adj: np.ndarray, node: int, limit: int, visited: np.ndarray,
                      prefetch: bool, fresh: np.ndarray) -> int:
    """Mark node's unvisited neighbours (ids below limit) visited, list them in fresh and (prefetch) request their
    key rows at once, to be scored in the same order; returns how many."""
    count = 0
    for j in range(adj.shape[1]):
        nb = adj[node, j]
        if nb < 0:
            break
        if nb >= limit or not _first_visit(visited, nb):
            continue
        fresh[count] = nb
        count += 1
        if prefetch:
            _prefetch_row(keys, nb)
    return count


@njit(cache=True, nogil=True, fastmath=True)
def _beam(keys: np.ndarray, adj: np.ndarray, entries: np.ndarray, q: np.ndarray, ef: int, limit: int,
          visited: np.ndarray, prefetch: bool, expand: int, cd: np.ndarray, ci: np.ndarray, rd: np.ndarray,
          ri: np.ndarray, fresh: np.ndarray) -> tuple[int, int]:
    """Best-first search with a result queue of size ef, maximizing q.k (hnswlib's searchBaseLayer, with
    several entry points), over nodes 0..limit-1 (links to higher ids are ignored).

    expand: candidates taken from the frontier per step (1: hnswlib's order). Taking several, each still good
    enough to enter the results, lets their graph rows and then all their neighbours' key rows be requested from
    memory together: a search with cold caches waits on one memory round trip per step instead of one per
    candidate. It may score a few more keys than expand=1 (a later candidate is expanded before the earlier
    ones' neighbours could have made it fall out of the results).
    visited: uint64 scratch of at least visited_words(limit) words, a bitset cleared here: it stays in the
    nearest cache, where a per-node array (4 bytes a key) went cold between a decode's layers. prefetch: request
    key rows before scoring them (same results).
    Scratch from the caller (no allocation per search: in a parallel region every malloc would contend for the
    daemon's few heap arenas): candidate heap cd/ci (grown here if it fills), result heap rd/ri (>= ef + 1),
    fresh (>= expand * (adj width + 1): the neighbours, then the step's candidates at its end). Leaves the best
    ef found as the min-heap rd/ri; returns its size and how many keys were scored."""
    cap = cd.shape[0]
    cs = 0
    rs = 0
    touched = 0
    taken = fresh.shape[0] - expand  # the step's candidates are kept at fresh[taken:]
    _clear_visited(visited, limit)
    for e in entries:
        if e < 0 or e >= limit or not _first_visit(visited, e):
            continue
        s = _dot(keys[e], q)
        touched += 1
        if cs == cap:
            cd, ci, cap = _grow(cd, ci, cs)
        cs = _push(cd, ci, cs, -s, e)
        rs = _push(rd, ri, rs, s, e)
        if rs > ef:
            rs = _pop(rd, ri, rs)
    while cs > 0:
        steps = 0
        while cs > 0 and steps < expand:
            if rs >= ef and -cd[0] < rd[0]:
                break
            fresh[taken + steps] = ci[0]
            steps += 1
            cs = _pop(cd, ci, cs)
            if prefetch and steps < expand and cs > 0:
                _prefetch_row(adj, ci[0])
        if steps == 0:
            break
        count = 0
        for x in range(steps):
            count += _fresh_neighbours(keys, adj, fresh[taken + x], limit, visited, prefetch, fresh[count:])
        for j in range(count):
            nb = fresh[j]
            s = _dot(keys[nb], q)
            touched += 1
            if rs < ef or s > rd[0]:
                if cs == cap:
                    cd, ci, cap = _grow(cd, ci, cs)
                cs = _push(cd, ci, cs, -s, nb)
                rs = _push(rd, ri, rs, s, nb)
                if rs > ef:
                    rs = _pop(rd, ri, rs)
        if prefetch and cs > 0:
            _prefetch_row(adj, ci[0])  # the next node to expand
    return rs, touched


@njit(cache=True, nogil=True, fastmath=True)
def _beam_group(keys: np.ndarray, adj: np.ndarray, entries: np.ndarray, qs: np.ndarray, ef: int, limit: int,
                visited: np.ndarray, prefetch: bool, cd: np.ndarray, ci: np.ndarray, rd: np.ndarray,
                ri: np.ndarray, sizes: np.ndarray, fresh: np.ndarray, s: np.ndarray) -> int:
    """_beam for a group of queries qs [g, d] over one graph (the query heads of one KV head): every key is
    read once and scored for all g queries; each query keeps its own result heap rd[h]/ri[h] (size in
    sizes[h]) of its best ef, and the frontier is ordered by a key's best score over the group. The search
    stops when no candidate can enter any query's results. s: float32 scratch [g]. Returns the keys scored
    (each for all g queries)."""
    g = qs.shape[0]
    cap = cd.shape[0]
    cs = 0
    touched = 0
    for h in range(g):
        sizes[h] = 0
    _clear_visited(visited, limit)
    for e in entries:
        if e < 0 or e >= limit or not _first_visit(visited, e):
            continue
        touched += 1
        best = _score_group(keys[e], qs, s)
        for h in range(g):
            sizes[h] = _push(rd[h], ri[h], sizes[h], s[h], e)
            if sizes[h] > ef:
                sizes[h] = _pop(rd[h], ri[h], sizes[h])
        if cs == cap:
            cd, ci, cap = _grow(cd, ci, cs)
        cs = _push(cd, ci, cs, -best, e)
    while cs > 0:
        floor = _INF  # the lowest score that still enters some query's results
        for h in range(g):
            if sizes[h] < ef:
                floor = -_INF
                break
            floor = min(floor, rd[h, 0])
        if -cd[0] < floor:
            break
        node = ci[0]
        cs = _pop(cd, ci, cs)
        count = _fresh_neighbours(keys, adj, node, limit, visited, prefetch, fresh)
        for j in range(count):
            nb = fresh[j]
            best = _score_group(keys[nb], qs, s)
            touched += 1
            entered = False
            for h in range(g):
                if sizes[h] < ef or s[h] > rd[h, 0]:
                    sizes[h] = _push(rd[h], ri[h], sizes[h], s[h], nb)
                    if sizes[h] > ef:
                        sizes[h] = _pop(rd[h], ri[h], sizes[h])
                    entered = True
            if entered:
                if cs == cap:
                    cd, ci, cap = _grow(cd, ci, cs)
                cs = _push(cd, ci, cs, -best, nb)
        if prefetch and cs > 0:
            _prefetch_row(adj, ci[0])
    return touched


@njit(cache=True, nogil=True, fastmath=True, inline="always")
def _score_group(key: np.ndarray, qs: np.ndarray, s: np.ndarray) -> np.float32:
    """s[h] = key . qs[h] for every query of the group; returns the best. Groups of 2 and 4 read the key once
    per element, into as many accumulators (vectorized along the key)."""
    g = qs.shape[0]
    if g == 4:
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for i in range(key.shape[0]):
            x = _widen(key[i])
            s0 += x * qs[0, i]
            s1 += x * qs[1, i]
            s2 += x * qs[2, i]
            s3 += x * qs[3, i]
        s[0], s[1], s[2], s[3] = s0, s1, s2, s3
    elif g == 2:
        s0 = s1 = np.float32(0.0)
        for i in range(key.shape[0]):
            x = _widen(key[i])
            s0 += x * qs[0, i]
            s1 += x * qs[1, i]
        s[0], s[1] = s0, s1
    else:
        for h in range(g):
            s[h] = _dot(key, qs[h])
    best = s[0]
    for h in range(1, g):
        best = max(best, s[h])
    return best


@njit(cache=True, nogil=True)
def beam_search(keys: np.ndarray, adj: np.ndarray, entries: np.ndarray, q: np.ndarray, ef: int, limit: int,
                visited: np.ndarray, prefetch: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """_beam with scratch of its own: (ids, scores) of the best ef found by decreasing score, and how many keys
    were scored."""
    width = adj.shape[1]
    cap = 4 * ef + entries.shape[0] + width
    rd = np.empty(ef + 1, np.float32)
    ri = np.empty(ef + 1, np.int64)
    rs, touched = _beam(keys, adj, entries, q, ef, limit, visited, prefetch, 1, np.empty(cap, np.float32),
                        np.empty(cap, np.int64), rd, ri, np.empty(width + 1, np.int64))
    order = np.argsort(-rd[:rs])
    return ri[:rs][order], rd[:rs][order], touched


def search_scratch(rows: int, ef: int, entries: int, width: int, group: int = 1) -> tuple[np.ndarray, ...]:
    """Scratch for `rows` concurrent searches of `group` queries each (search_rows / search_rows_parallel):
    candidate heap keys and ids, result heap keys and ids [rows, group, ef + 1], result heap sizes and scores
    [rows, group], fresh neighbours (room for MAX_EXPAND steps' candidates and their neighbours)."""
    cap = 4 * ef + entries + MAX_EXPAND * width
    return (np.empty((rows, cap), np.float32), np.empty((rows, cap), np.int64),
            np.empty((rows, group, ef + 1), np.float32), np.empty((rows, group, ef + 1), np.int64),
            np.empty((rows, group), np.int64), np.empty((rows, group), np.float32),
            np.empty((rows, MAX_EXPAND * (width + 1)), np.int64))


@njit(cache=True, nogil=True)
def _grow(hd: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    cap = 2 * hd.shape[0]
    nd = np.empty(cap, np.float32)
    ni = np.empty(cap, np.int64)
    nd[:size] = hd[:size]
    ni[:size] = hi[:size]
    return nd, ni, cap


@njit(cache=True, nogil=True)
def search_rows(keys: np.ndarray, key_base: int, adj: np.ndarray, entries: np.ndarray, queries: np.ndarray,
                key_of: np.ndarray, graph_of: np.ndarray, count: int, ef: int, group: int, lo: int, hi: int,
                id_base: int, ids: np.ndarray, scores: np.ndarray, touched: np.ndarray, visited: np.ndarray,
                prefetch: bool, expand: int, cd: np.ndarray, ci: np.ndarray, rd: np.ndarray, ri: np.ndarray,
                sizes: np.ndarray, s: np.ndarray, fresh: np.ndarray) -> None:
    """Search the query rows of groups lo..hi-1, group i being rows i*group .. i*group+group-1 (one search for
    the group, _beam_group, which must share a graph and key head; group 1: _beam per row). keys [G_k, rows, d]
    with node i at row key_base + i, adj [G_a, cap, W], entries [G_a, E] (-1 padded), queries [m, d]; row i
    searches keys[key_of[i]] over adj[graph_of[i]] among the first `count` nodes.
    Writes ids [m, k] (node + id_base, -1 padded), their scores [m, k] (-inf padded), by decreasing score, and
    touched [m] (keys scored, by the row's search). visited: uint64 bitset scratch (>= visited_words(count));
    cd..fresh: one row of search_scratch(.., group) for ef >= max(ef, k)."""
    k = ids.shape[1]
    width = max(ef, k)
    for grp in range(lo, hi):
        first = grp * group
        g = graph_of[first]
        kv = keys[key_of[first], key_base:]
        if group == 1:
            sizes[0], t = _beam(kv, adj[g], entries[g], queries[first], width, count, visited, prefetch, expand,
                                cd, ci, rd[0], ri[0], fresh)
        else:
            t = _beam_group(kv, adj[g], entries[g], queries[first:first + group], width, count, visited, prefetch,
                            cd, ci, rd, ri, sizes, fresh, s)
        for h in range(group):
            _write_top(rd[h], ri[h], sizes[h], id_base, ids[first + h], scores[first + h])
            touched[first + h] = t


@njit(cache=True, nogil=True)
def _write_top(rd: np.ndarray, ri: np.ndarray, rs: int, id_base: int, ids: np.ndarray, scores: np.ndarray) -> None:
    """The k = len(ids) best of the min-heap rd/ri (size rs) into ids (+ id_base) / scores by decreasing score
    (-1 / -inf padded); consumes the heap."""
    k = ids.shape[0]
    kk = min(k, rs)
    while rs > kk:  # drop the worst of the ef found, then pop the k best in increasing order
        rs = _pop(rd, ri, rs)
    for j in range(kk - 1, -1, -1):
        ids[j] = ri[0] + id_base
        scores[j] = rd[0]
        rs = _pop(rd, ri, rs)
    ids[kk:] = -1
    scores[kk:] = -_INF


@njit(cache=True, nogil=True, parallel=True)
def search_rows_parallel(keys: np.ndarray, key_base: int, adj: np.ndarray, entries: np.ndarray,
                         queries: np.ndarray, key_of: np.ndarray, graph_of: np.ndarray, count: int, ef: int,
                         group: int, id_base: int, ids: np.ndarray, scores: np.ndarray, touched: np.ndarray,
                         visited: np.ndarray, prefetch: bool, expand: int, cd: np.ndarray, ci: np.ndarray,
                         rd: np.ndarray, ri: np.ndarray, sizes: np.ndarray, s: np.ndarray, fresh: np.ndarray) -> None:
    """search_rows over every group of query rows as one parallel region (kvd.parallel): visited
    [team, >= visited_words(count)] and the search_scratch arrays [team, ...] are per thread of the region."""
    for i in prange(queries.shape[0] // group):
        t = get_thread_id()
        search_rows(keys, key_base, adj, entries, queries, key_of, graph_of, count, ef, group, i, i + 1, id_base, ids,
                    scores, touched, visited[t], prefetch, expand, cd[t], ci[t], rd[t], ri[t], sizes[t], s[t],
                    fresh[t])


@njit(cache=True, nogil=True, fastmath=True)
def _search_with_tails(keys: np.ndarray, key_base: int, adj: np.ndarray, entries: np.ndarray, q: np.ndarray,
                       count: int, width: int, tails: np.ndarray, visited: np.ndarray, prefetch: bool, expand: int,
                       cd: np.ndarray, ci: np.ndarray, rd: np.ndarray, ri: np.ndarray, fresh: np.ndarray) -> int:
    """_beam over one key head keys [rows, d] (node i at row key_base + i), then every row of the position
    ranges tails [T, 2] (keys not in the graph: e.g. decode keys offloaded since its last add) scored exactly
    into the same result heap (as node p - key_base). Returns the heap's size."""
    rs, _ = _beam(keys[key_base:], adj, entries, q, width, count, visited, prefetch, expand, cd, ci, rd, ri, fresh)
    for t in range(tails.shape[0]):
        for p in range(tails[t, 0], tails[t, 1]):
            s = _dot(keys[p], q)
            if rs < width or s > rd[0]:
                rs = _push(rd, ri, rs, s, p - key_base)
                if rs > width:
                    rs = _pop(rd, ri, rs)
    return rs


@njit(cache=True, nogil=True)
def _search_top(keys: np.ndarray, key_base: int, adj: np.ndarray, entries: np.ndarray, q: np.ndarray, count: int,
                width: int, tails: np.ndarray, visited: np.ndarray, prefetch: bool, expand: int, cd: np.ndarray,
                ci: np.ndarray, rd: np.ndarray, ri: np.ndarray, fresh: np.ndarray, ids: np.ndarray,
                scores: np.ndarray) -> int:
    """_search_with_tails, then its best k = len(ids) as session positions into ids / scores (_write_top);
    returns how many are valid."""
    rs = _search_with_tails(keys, key_base, adj, entries, q, count, width, tails, visited, prefetch, expand, cd, ci,
                            rd, ri, fresh)
    _write_top(rd, ri, rs, key_base, ids, scores)
    return min(ids.shape[0], rs)


@njit(cache=True, nogil=True, parallel=True)
def search_attend_parallel(keys: np.ndarray, values: np.ndarray, key_base: int, adj: np.ndarray,
                           entries: np.ndarray, queries: np.ndarray, key_of: np.ndarray, graph_of: np.ndarray,
                           count: int, ef: int, tails: np.ndarray, scale: float, ids: np.ndarray,
                           scores: np.ndarray, out: np.ndarray, lse: np.ndarray, counts: np.ndarray,
                           visited: np.ndarray, prefetch: bool, expand: int, cd: np.ndarray, ci: np.ndarray,
                           rd: np.ndarray, ri: np.ndarray, fresh: np.ndarray, weights: np.ndarray, row: np.ndarray
                           ) -> None:
    """A decode Retrieve's whole compiled part as one parallel region: per query head h, the graph search, the
    exact scan of the tail ranges (session positions), the top k = ids.shape[1] as session positions into
    ids[h] / scores[h] (-1 / -inf padded; counts[h] valid) and the softmax attention over their values into
    out[h], lse[h] (kvd.gather_kernels.attend_head). keys / values: the session's stores [Hkv, rows, d]; graph
    node i is position key_base + i. Scratch per region thread: visited and search_scratch(.., group=1) rows,
    weights float64 [team, >= k], row float32 [team, d]."""
    k = ids.shape[1]
    width = max(ef, k)
    for h in prange(queries.shape[0]):
        t = get_thread_id()
        g = graph_of[h]
        counts[h] = _search_top(keys[key_of[h]], key_base, adj[g], entries[g], queries[h], count, width, tails,
                                visited[t], prefetch, expand, cd[t], ci[t], rd[t, 0], ri[t, 0], fresh[t], ids[h],
                                scores[h])
        lse[h] = attend_head(values[key_of[h]], ids[h], scores[h], scale, weights[t], row[t], out[h])


@njit(cache=True, nogil=True, parallel=True)
def search_attend_past_parallel(keys: np.ndarray, values: np.ndarray, key_base: int, adj: np.ndarray,
                                entries: np.ndarray, queries: np.ndarray, key_of: np.ndarray, graph_of: np.ndarray,
                                count: int, ef: int, tails: np.ndarray, scale: float, ids: np.ndarray,
                                scores: np.ndarray, counts: np.ndarray, past: np.ndarray, seen: np.ndarray,
                                bound: np.ndarray, packed: np.ndarray, loaded: np.ndarray, visited: np.ndarray,
                                prefetch: bool, expand: int, cd: np.ndarray, ci: np.ndarray, rd: np.ndarray,
                                ri: np.ndarray, fresh: np.ndarray, scratch: tuple) -> None:
    """search_attend_parallel with RetroAttention's past queries (kvd.retro): per query head, after the search,
    the current query's attention and the past queries' over their newly seen keys in one pass over the rows
    (retro.attend_past_heads; past [P, Hq, d], seen [P, Hq, S], bound [P]). The results go straight into one
    sequence's block of a packed reply, packed float32 [P + 1, Hq, d + 1] (the past queries' rows, then the
    current query's; log-sum-exp in the last column: RetrieveResponse.packed), so that nothing is copied after
    the region. loaded: float64 [Hq] scratch that keeps the kernel's prefetching loads; scratch:
    retro.past_scratch for the region's threads (allocated outside it: a malloc per head inside contends for the
    heap arenas)."""
    k = ids.shape[1]
    width = max(ef, k)
    group = queries.shape[0] // values.shape[0]
    rows, d = past.shape[0], past.shape[2]
    out, lse = packed[rows, :, :d], packed[rows, :, d]
    past_out, past_lse = packed[:rows, :, :d], packed[:rows, :, d]
    tables, new, wanted, weights, live, top, total, acc, row = scratch
    for h in prange(queries.shape[0]):
        t = get_thread_id()
        g = graph_of[h]
        counts[h] = _search_top(keys[key_of[h]], key_base, adj[g], entries[g], queries[h], count, width, tails,
                                visited[t], prefetch, expand, cd[t], ci[t], rd[t, 0], ri[t, 0], fresh[t], ids[h],
                                scores[h])
        loaded[h] = attend_past_heads(keys, values, ids, scores, scale, group, past, seen, bound, out, lse, past_out,
                                      past_lse, h, h + 1, tables[t], new[t], wanted[t], weights[t], live[t], top[t],
                                      total[t], acc[t], row[t])


# ------------------------------------------------------------------------------------------ construction


@njit(cache=True, nogil=True, fastmath=True)
def _rng_select(keys: np.ndarray, cand: np.ndarray, cdist: np.ndarray, count: int, degree: int,
                out: np.ndarray) -> int:
    """RNG occlusion pruning of cand[:count] (sorted by cdist = squared distance to the pivot): c is dropped
    when an already kept r has d(c, r) < d(c, pivot); at most `degree` kept. Returns how many (in out)."""
    kept = 0
    for a in range(count):
        c = cand[a]
        ok = True
        for b in range(kept):
            if _sqdist(keys[c], keys[out[b]]) < cdist[a]:
                ok = False
                break
        if ok:
            out[kept] = c
            kept += 1
            if kept >= degree:
                break
    return kept


@njit(cache=True, nogil=True, fastmath=True)
def list_edges(keys: np.ndarray, lists: np.ndarray, degree: int, pivots: int, lo: int, hi: int, out: np.ndarray
               ) -> None:
    """Projection of query top-N lists lo..hi-1 onto the keys: within a list, every member takes the other
    members as candidates (nearest first) and keeps an RNG-pruned set of at most `degree` (RoarGraph's pivot
    step applied to every member, not only the top-1, which with attention sinks is nearly always the same
    key); only the first `pivots` members pivot. Pairwise distances are computed at most once per list, when
    first needed. out: int32 [n_lists * N * degree, 2] (src, dst),
    rows of lists outside lo..hi untouched, unused rows -1."""
    width = lists.shape[1]
    pair = np.empty((width, width), np.float32)
    ids = np.empty(width, np.int64)
    d = np.empty(width, np.float32)
    sel = np.empty(degree, np.int64)
    for li in range(lo, hi):
        cnt = 0
        while cnt < width and lists[li, cnt] >= 0:
            ids[cnt] = lists[li, cnt]
            cnt += 1
        npiv = min(pivots, cnt)
        for a in range(cnt):
            pair[a, :cnt] = -1.0                                # -1: not computed yet
            pair[a, a] = _INF
        for p in range(npiv):
            for j in range(cnt):
                if pair[p, j] < 0:
                    v = _sqdist(keys[ids[p]], keys[ids[j]])
                    pair[p, j] = v
                    pair[j, p] = v
                d[j] = pair[p, j]
            order = np.argsort(d[:cnt])
            kept = 0
            for a in range(cnt - 1):
                c = order[a]
                ok = True
                for b in range(kept):
                    v = pair[c, sel[b]]
                    if v < 0:
                        v = _sqdist(keys[ids[c]], keys[ids[sel[b]]])
                        pair[c, sel[b]] = v
                        pair[sel[b], c] = v
                    if v < d[c]:
                        ok = False
                        break
                if ok:
                    sel[kept] = c
                    kept += 1
                    if kept >= degree:
                        break
            base = (li * width + p) * degree
            for j in range(kept):
                out[base + j, 0] = ids[p]
                out[base + j, 1] = ids[sel[j]]


@njit(cache=True, nogil=True)
def csr(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counting-sort edges by source: (indptr int64 [n+1], neighbours int64 [E])."""
    indptr = np.zeros(n + 1, np.int64)
    for s in src:
        indptr[s + 1] += 1
    for i in range(n):
        indptr[i + 1] += indptr[i]
    fill = indptr[:-1].copy()
    nbrs = np.empty(src.shape[0], np.int64)
    for e in range(src.shape[0]):
        nbrs[fill[src[e]]] = dst[e]
        fill[src[e]] += 1
    return indptr, nbrs


@njit(cache=True, nogil=True)
def window_edges(lists: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Co-relevance candidates from query top-N lists: members whose ranks differ by at most `window`,
    both directions (no distances). Returns (src, dst) int64."""
    s, width = lists.shape
    total = 2 * s * width * window
    src = np.empty(total, np.int64)
    dst = np.empty(total, np.int64)
    e = 0
    for li in range(s):
        for a in range(width):
            u = lists[li, a]
            if u < 0:
                break
            for b in range(a + 1, min(width, a + window + 1)):
                v = lists[li, b]
                if v < 0:
                    break
                src[e] = u
                dst[e] = v
                src[e + 1] = v
                dst[e + 1] = u
                e += 2
    return src[:e], dst[:e]


@njit(cache=True, nogil=True, fastmath=True)
def prune_nodes(keys: np.ndarray, indptr: np.ndarray, nbrs: np.ndarray, degree: int, pool: int, lo: int,
                hi: int, adj: np.ndarray) -> None:
    """Nodes lo..hi-1: candidates nbrs[indptr[i]:indptr[i+1]] (repeats allowed) are deduped, sorted by
    distance, cut to `pool` and RNG-pruned to at most `degree`; the result is written left-packed into
    adj[i] (the rest of the row set to -1)."""
    sel = np.empty(degree, np.int64)
    for i in range(lo, hi):
        adj[i, :] = -1
        a, b = indptr[i], indptr[i + 1]
        if b == a:
            continue
        c = np.unique(nbrs[a:b])
        d = np.empty(c.shape[0], np.float32)
        for j in range(c.shape[0]):
            d[j] = _sqdist(keys[i], keys[c[j]]) if c[j] != i else _INF
        order = np.argsort(d)
        cnt = min(pool, c.shape[0])
        cs = c[order[:cnt]]
        ds = d[order[:cnt]]
        while cnt > 0 and ds[cnt - 1] == _INF:
            cnt -= 1
        kept = _rng_select(keys, cs, ds, cnt, degree, sel)
        for j in range(kept):
            adj[i, j] = sel[j]


@njit(cache=True, nogil=True, fastmath=True)
def _prune_found(keys: np.ndarray, v: int, found: np.ndarray, degree: int, sel: np.ndarray) -> int:
    d = np.empty(found.shape[0], np.float32)
    for j in range(found.shape[0]):
        d[j] = _sqdist(keys[v], keys[found[j]]) if found[j] != v else _INF
    order = np.argsort(d)
    cnt = found.shape[0]
    cs = found[order]
    ds = d[order]
    while cnt > 0 and ds[cnt - 1] == _INF:
        cnt -= 1
    return _rng_select(keys, cs, ds, cnt, degree, sel)


@njit(cache=True, nogil=True, fastmath=True)
def enhance_nodes(keys: np.ndarray, adj: np.ndarray, entries: np.ndarray, count: int, ef: int, degree: int,
                  lo: int, hi: int, out: np.ndarray) -> None:
    """Connectivity enhancement for nodes lo..hi-1: each beam-searches the graph (first `count` keys) with its
    own key as the query and keeps an RNG-pruned set (at most `degree`) of what it found: out[i] (int32)."""
    visited = np.zeros(_visited_words(count), np.uint64)
    sel = np.empty(degree, np.int64)
    for v in range(lo, hi):
        found, _, _ = beam_search(keys, adj, entries, keys[v], ef, count, visited)
        kept = _prune_found(keys, v, found, degree, sel)
        out[v, :] = -1
        for j in range(kept):
            out[v, j] = sel[j]


@njit(cache=True, nogil=True, fastmath=True)
def _link(keys: np.ndarray, adj: np.ndarray, node: int, new: int) -> None:
    """Add edge node -> new; when node's row is full, new replaces the farthest neighbour if it is nearer
    (one distance per slot, unlike a full RNG re-prune)."""
    width = adj.shape[1]
    cnt = 0
    while cnt < width and adj[node, cnt] >= 0:
        if adj[node, cnt] == new:
            return
        cnt += 1
    if cnt < width:
        adj[node, cnt] = new
        return
    far = 0
    far_d = np.float32(-1.0)
    for j in range(width):
        dj = _sqdist(keys[node], keys[adj[node, j]])
        if dj > far_d:
            far, far_d = j, dj
    if _sqdist(keys[node], keys[new]) < far_d:
        adj[node, far] = new


@njit(cache=True, nogil=True, fastmath=True)
def insert_nodes(keys: np.ndarray, adj: np.ndarray, entries: np.ndarray, lo: int, hi: int, ef: int,
                 degree: int) -> int:
    """Insert keys lo..hi-1 (rows of keys/adj already allocated) into the graph over keys 0..lo-1, one after
    another: beam-search for the new key, RNG-prune what was found to at most `degree` out-edges, link back
    (re-pruning full rows), and link to the previous position (lo-1 .. hi-2) both ways, which keeps every key
    reachable. Returns the number of keys scored."""
    touched = 0
    sel = np.empty(degree, np.int64)
    visited = np.zeros(_visited_words(hi), np.uint64)
    for v in range(lo, hi):
        found, _, t = beam_search(keys, adj, entries, keys[v], ef, v, visited)
        touched += t
        kept = _prune_found(keys, v, found, degree, sel)
        adj[v, :] = -1
        for j in range(kept):
            adj[v, j] = sel[j]
            _link(keys, adj, sel[j], v)
        if v > 0:
            _link(keys, adj, v, v - 1)
            _link(keys, adj, v - 1, v)
    return touched
