"""Attention-aware graph index (RoarGraph-style projection of the prefill query -> key graph, RESEARCH.md §1).

Build (graph_build.py): from the sampled prefill queries' exact top-N keys (BuildHints.topn_ids from the GPU,
or computed here exactly), project the query->key bipartite graph onto the keys (every list member pivots
over its list-mates, L2 RNG pruning, degree m, reverse edges re-pruned), then connectivity enhancement (each
key beam-searches the graph with itself and adds pruned supply neighbours; out-degree < 2m) and an in-edge
for every key nobody links to. Entry points: the keys that occur in most top-N lists (sinks and other keys
most queries want), all scored first by every search.
Search: best-first beam search by inner product, result queue ef, compiled with numba (graph_kernels.py),
counting every key it scores (keys_touched is exact). add(): new keys are inserted one by one (beam search,
RNG prune, reverse links, a link to the previous position): decode-time keys are indexed too.

Params (strings): m (32: projection/supply degree, rows hold 2m), ef (search beam, 512), enhance_ef (32;
0 skips the step), entries (128), per ("kv": one graph per KV head from the group's pooled queries |
"query": one per query head, as RoarGraph), sample (prefill queries used per query head, 4096), topn (N when
the lists are computed here, 100), pivots (list members that pivot, all), window (>0: cheap rank-window
projection instead of the per-list RNG), insert_ef (64), threads (worker threads; default one per core),
store (auto | session | bf16 | fp32: session = no copy of the keys, the searches read the session's own
store, given with every call as StoredKeys (bf16 and float32 sessions); bf16/fp32 = a copy in that precision;
auto = session when the caller passes the session's keys and their dtype allows, else bf16), schedule
(auto: region where the host allows it, else claim | region: one numba parallel region, kvd.parallel |
claim: a search's query heads are claimed one at a time by worker-pool threads | ranges: one fixed range per
pool thread), chunk (region: query heads claimed together by one thread, 1; consecutive heads share a
KV head's graph), prefetch (1: key rows are requested from memory before they are scored | 0; same results), expand
(4: frontier candidates taken per search step, their rows and their neighbours' key rows requested together, so a
search with cold caches waits on memory once per step, and may score a few more keys; 1: one at a time, hnswlib's
order; at most 8; group searches take one), group (1: each query head searches alone | g > 1 dividing the GQA group,
per=kv: g heads of one KV head search its graph together, each key read once and scored for all g, the frontier
ordered by the best score over them, each head keeping its own ef best), touched (exact: keys_touched is reported |
off: left 0, one reduction less per call; the daemon serves with off), fuse (1: a decode Retrieve in mode ATTENTION
runs the search, the exact scan of the keys not yet added and the attention, with RetroAttention's past queries, as
one compiled parallel region, search_attend | current: the past queries in their own pass afterwards | 0: step by
step; same results); threads, schedule, prefetch, expand, chunk, group, touched and fuse can also be given per call.
With StoredKeys (base b), a search returns positions b + local id (SearchResult.id_base = b): the kernel writes
them, so a decode Retrieve needs no pass over the ids to shift them.
Presets: default = quality; pivots=32 = balanced; window=2,enhance_ef=0 = fast build.
Concurrency: add() and search() of one index must not overlap (the caller serializes per layer); builds and
searches of different indexes may, and use separate worker pools.

Why (recall@100 vs fraction of keys scored; realistic = bench.qkdata.realistic, minilm = real MiniLM Q/K):
- numba search, not hnswlib's C++ over an injected level-0 graph (Index(params=state) with our edges,
  verified identical results): hnswlib was ~1.4x faster per query (116 vs 161 us, ef=100, 32K keys, 2 cores)
  but has one entry point, cannot count distance computations and needs its whole state rebuilt on every
  insertion. Scoring the popular keys first lifted realistic 128K recall at ~2% from 0.87 (one entry) to
  0.94-0.95. numba also runs the construction: the projection in batched torch took 93 s at 32K keys vs
  ~18 s compiled (loaded 2 cores). faiss was not tried: no need left. Memory: a bf16 copy of the keys (param
  store=bf16, the default; exact for bf16 sessions, and returned keys are rescored from the session anyway)
  + int32 rows: 256 + 8m bytes per key per graph at head_dim 128 (store=fp32: 512 + 8m). The bf16 store
  found the same ids at the same speed or better (32K keys, 2 cores: 265-337 vs 350-426 ns per key scored).
  In the daemon the index reads the session's store instead (store=auto): only the rows are the index's,
  8m bytes per key per graph, or 4(m + 1) without the enhancement step (the fast-build preset), which is
  what lets a 512K-token session's graphs fit beside its 64 GiB of KV on a 128 GiB host.
- every list member pivots: with sinks, the top-1 key of 4096 queries was only 62 distinct keys, so
  RoarGraph's top-1 pivot degenerates (0.34 recall at ef=100 vs 0.70, 32K, S=1024).
- L2 construction distance: RoarGraph's -q.k metric pruned heavy-tailed keys to degree < 2 (0.59 at ef=100);
  cosine was worse per key scored (32K: 0.93 at 6.0% vs L2 0.88 at 3.6%).
- per KV head: on 16 cores, 8 KV x 32 query heads, 32K keys, per-query graphs gave +0.003..0.017 recall at
  equal ef for 2x the bytes per key (adjacency x4) and 1.35x the build time.
- measured on a 16-core H100 host (realistic, 8 KV x 32 query heads, 128K keys; defaults): recall 0.942 at
  1.95% of keys scored (ef=500), 0.960 at 2.31% (ef=600); a layer's 8 graphs built in 15.5 s with 16 cores
  (pivots=32: 7.9 s, 0.937 at 2.05%; window=2,enhance_ef=0: 2.1 s, 0.916 at 2.16%); one layer's search
  (32 query heads, ef=600) 2.4 ms on 16 threads, 12 ms on 2; add() 0.13 ms per token for 8 KV heads.
  HNSW (hnswlib M=16, same data, 1 KV head): 0.80 at 2.3%, 0.87 at 3.6%, 0.93 at 8%.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kvd import hugepages, parallel
from kvd.gather_kernels import store_array, supported
from kvd.index import graph_kernels as gk
from kvd.index.base import (
    Attended,
    AttendSlots,
    BuildHints,
    IndexShape,
    KeyIndex,
    SearchResult,
    StoredKeys,
    packed_slots,
)
from kvd.index.graph_build import GraphParams, build_graph, exact_topn
from kvd.index.wave_io import pack, unpack
from kvd.retro import PastQueries, past_scratch, seen_arrays
from kvd.workers import run_claimed, run_ranges

_CONCURRENT_GRAPHS = 4
DEFAULTS = {"m": "32", "ef": "512", "enhance_ef": "32", "entries": "128", "per": "kv", "sample": "4096",
            "topn": "100", "insert_ef": "64", "pivots": "100000", "window": "0", "store": "auto",
            "threads": "0", "schedule": "auto", "prefetch": "1", "chunk": "1", "group": "1", "touched": "exact",
            "fuse": "1", "expand": "4"}
_STORE_DTYPES = {"bf16": np.uint16, "fp32": np.float32}  # bf16 keys are kept as their bit patterns
_STORES = ("auto", "session", *_STORE_DTYPES)
_SESSION_DTYPES = (torch.bfloat16, torch.float32)  # session stores the kernels read as they are
# how a search's query heads are spread over threads: one parallel region (kvd.parallel), worker-pool threads
# claiming one head at a time, or one fixed range per pool thread; auto = region where the host has it, else claim
_SCHEDULES = ("auto", "region", "claim", "ranges")
# fuse: 1 = search, tail scan, attention and RetroAttention's past queries in one region; current = the past queries
# in their own region afterwards (retro overhead +29% against +15% fused on the H100 host, BENCHMARKS.md); 0 = step
# by step
_FUSE = ("0", "1", "current")


class GraphIndex(KeyIndex):
    kind = "graph"
    takes_session_dtype = True

    def __init__(self, shape: IndexShape, params: dict[str, str] | None = None) -> None:
        super().__init__(shape, params)
        if self._param("per") not in ("kv", "query"):
            raise ValueError("graph param 'per' must be 'kv' or 'query'")
        if self._param("store") not in _STORES:
            raise ValueError(f"graph param 'store' must be one of {list(_STORES)}")
        if int(self._param("chunk")) < 1:
            raise ValueError("graph param 'chunk' must be at least 1")
        if self._param("schedule") not in _SCHEDULES:
            raise ValueError(f"graph param 'schedule' must be one of {sorted(_SCHEDULES)}")
        if self._param("touched") not in ("exact", "off"):
            raise ValueError("graph param 'touched' must be 'exact' or 'off'")
        if self._param("fuse") not in _FUSE:
            raise ValueError(f"graph param 'fuse' must be one of {list(_FUSE)}")
        self._search_group(None)  # validates 'group'
        self._expand(None)
        self._mode = ""  # where the keys are read: "session" or a copy ("bf16" | "fp32"); set by the first build/add
        self._keys = np.zeros((shape.num_kv_heads, 0, shape.head_dim), dtype=np.uint16)  # the copy: [Hkv, cap, d]
        self._adj = np.zeros((self.num_graphs, 0, self._graph_params().width), dtype=np.int32)   # [G, cap, W]
        self._entries = np.full((self.num_graphs, 1), -1, dtype=np.int64)                       # [G, E]
        self._count = 0
        # per query head: its KV head (key rows) and its graph
        self._heads = (np.arange(shape.num_query_heads) // shape.group_size, self._graph_of_query_head())

    # --------------------------------------------------------------------------------------- params
    def _param(self, name: str, params: dict[str, str] | None = None) -> str:
        return (params or {}).get(name, self.params.get(name, DEFAULTS[name]))

    @property
    def _m(self) -> int:
        return int(self._param("m"))

    @property
    def num_graphs(self) -> int:
        return self.shape.num_query_heads if self._param("per") == "query" else self.shape.num_kv_heads

    def _graph_params(self) -> GraphParams:
        return GraphParams(m=self._m, enhance_ef=int(self._param("enhance_ef")),
                           n_entries=int(self._param("entries")), window=int(self._param("window")),
                           pivots=int(self._param("pivots")), threads=int(self.params.get("threads", 0)))

    def check_search_params(self, params: dict[str, str]) -> None:
        for name in ("ef", "chunk"):  # threads: checked by the engine for every kind
            if name in params and not params[name].isdigit():
                raise ValueError(f"graph search param {name!r} must be a non-negative integer, not {params[name]!r}")
        if params.get("schedule", "auto") not in _SCHEDULES:
            raise ValueError(f"graph search param 'schedule' must be one of {sorted(_SCHEDULES)}")
        if params.get("touched", "exact") not in ("exact", "off"):
            raise ValueError("graph search param 'touched' must be 'exact' or 'off'")
        if params.get("fuse", "1") not in _FUSE:
            raise ValueError(f"graph search param 'fuse' must be one of {list(_FUSE)}")
        self._search_group(params)
        self._expand(params)

    def _expand(self, params: dict[str, str] | None) -> int:
        """Frontier candidates a search takes per step (gk._beam)."""
        expand = self._param("expand", params)
        if not expand.isdigit() or not 1 <= int(expand) <= gk.MAX_EXPAND:
            raise ValueError(f"graph param 'expand' must be an integer from 1 to {gk.MAX_EXPAND}, not {expand!r}")
        return int(expand)

    def _search_group(self, params: dict[str, str] | None) -> int:
        """Query heads searched together (one beam over their KV head's graph, each key read once)."""
        group = self._param("group", params)
        if not group.isdigit() or int(group) < 1 or self.shape.group_size % int(group):
            raise ValueError(f"graph param 'group' must divide the GQA group size {self.shape.group_size}, "
                             f"not {group!r}")
        if int(group) > 1 and self._param("per") == "query":
            raise ValueError("graph param 'group' > 1 needs per=kv (the group's heads share one graph)")
        return int(group)

    def _graph_of_query_head(self) -> np.ndarray:
        heads = np.arange(self.shape.num_query_heads)
        return heads if self._param("per") == "query" else heads // self.shape.group_size

    # ------------------------------------------------------------------------------------ key access
    def _choose_store(self, stored: StoredKeys | None) -> None:
        want = self._param("store")
        if want == "auto":
            want = "session" if stored is not None and stored.keys.dtype in _SESSION_DTYPES else "bf16"
        if want == "session":
            if stored is None:
                raise ValueError("graph param store=session needs the session's keys with every call")
            if stored.keys.dtype not in _SESSION_DTYPES:
                raise ValueError(f"graph store=session reads bfloat16 or float32 sessions, not {stored.keys.dtype}")
        self._mode = want
        self._keys = np.zeros((self.shape.num_kv_heads, 0, self.shape.head_dim),
                              dtype=_STORE_DTYPES.get(want, np.uint16))

    def _key_rows(self, stored: StoredKeys | None, count: int) -> tuple[np.ndarray, int]:
        """(keys [Hkv, rows, d] as the kernels read them, row of local id 0), covering `count` local ids."""
        if self._mode != "session":
            return self._keys, 0
        if stored is None:
            raise ValueError("this graph index reads the session's keys: pass them (StoredKeys) with every call")
        if stored.keys.shape[1] < stored.base + count or stored.keys.shape[0] != self.shape.num_kv_heads:
            raise ValueError(f"the session's keys hold {stored.keys.shape[1]} rows, the index needs "
                             f"{stored.base + count}")
        return store_array(stored.keys), stored.base

    # ---------------------------------------------------------------------------------------- build
    def build(self, keys: torch.Tensor, values: torch.Tensor | None, hints: BuildHints | None,
              stored: StoredKeys | None = None) -> None:
        self._check_keys(keys)
        n = keys.shape[1]
        self._choose_store(stored)
        if self._mode != "session":
            self._keys = self._to_store(keys)
        self._count = n
        if n == 0:
            self._adj = np.zeros((self.num_graphs, 0, self._graph_params().width), dtype=np.int32)
            self._entries = np.full((self.num_graphs, 1), -1, dtype=np.int64)
            return
        # graphs are built concurrently (their serial steps overlap), each step's ranges in the build pool;
        # construction measures in float32, one graph's key head converted at a time (not the whole layer)
        with ThreadPoolExecutor(max_workers=min(self.num_graphs, _CONCURRENT_GRAPHS)) as graphs:
            results = list(graphs.map(lambda g: build_graph(keys[self._key_head(g)].float().numpy(),
                                                            self._lists(g, keys, hints), self._graph_params()),
                                      range(self.num_graphs)))
        width = max(e.shape[0] for _, e in results)
        self._adj = np.empty((len(results), *results[0][0].shape), dtype=np.int32)
        hugepages.advise(self._adj)
        for g, (rows, _) in enumerate(results):
            self._adj[g] = rows
        self._entries = np.full((self.num_graphs, width), -1, dtype=np.int64)
        for g, (_, e) in enumerate(results):
            self._entries[g, : e.shape[0]] = e

    def _key_head(self, graph: int) -> int:
        return graph // self.shape.group_size if self._param("per") == "query" else graph

    def _query_heads(self, graph: int) -> list[int]:
        if self._param("per") == "query":
            return [graph]
        g = self.shape.group_size
        return list(range(graph * g, (graph + 1) * g))

    def _lists(self, graph: int, keys: torch.Tensor, hints: BuildHints | None) -> np.ndarray:
        """The top-N key lists of the sampled queries of this graph's query heads (int32 [S, N])."""
        sample = int(self._param("sample"))
        n = keys.shape[1]
        parts = []
        for h in self._query_heads(graph):
            if hints is not None and hints.topn_ids is not None:
                ids = hints.topn_ids[h]
                parts.append(ids[_subsample(ids.shape[0], sample)])
            else:
                kv = keys[self._key_head(graph)].float()
                queries = self._sample_queries(h, kv, hints, sample)
                parts.append(exact_topn(kv, queries, int(self._param("topn"))))
        lists = torch.cat(parts).numpy()
        return np.where((lists >= 0) & (lists < n), lists, -1).astype(np.int32)

    def _sample_queries(self, head: int, kv: torch.Tensor, hints: BuildHints | None, sample: int
                        ) -> torch.Tensor:
        if hints is not None and hints.queries is not None:
            q = hints.queries[head].float()
            return q[_subsample(q.shape[0], sample)]
        # no queries known: fall back to keys as pseudo-queries (a plain key graph, not attention-aware)
        return kv[_subsample(kv.shape[0], min(sample, 1024))]

    def _to_store(self, keys: torch.Tensor) -> np.ndarray:
        """Keys as the index keeps them: bf16 bit patterns (exact for bf16 sessions; the search only ranks,
        every returned key is rescored exactly from the session) or float32."""
        if self._keys.dtype == np.uint16:
            return np.ascontiguousarray(keys.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
        return np.ascontiguousarray(keys.float().numpy())

    def _check_keys(self, keys: torch.Tensor) -> None:
        if keys.dim() != 3 or keys.shape[0] != self.shape.num_kv_heads or keys.shape[2] != self.shape.head_dim:
            raise ValueError(f"keys must be [{self.shape.num_kv_heads}, n, {self.shape.head_dim}]")

    # ------------------------------------------------------------------------------------------ add
    def add(self, keys: torch.Tensor, values: torch.Tensor | None, stored: StoredKeys | None = None) -> None:
        self._check_keys(keys)
        n_new = keys.shape[1]
        if n_new == 0:
            return
        if not self._mode:
            self._choose_store(stored)
        lo, hi = self._count, self._count + n_new
        key_rows, base = self._key_rows(stored, hi)
        self._reserve(hi)
        if lo == 0:  # never built: start from key 0
            self._entries = np.zeros((self.num_graphs, 1), dtype=np.int64)
        if self._mode != "session":
            self._keys[:, lo:hi] = self._to_store(keys)
            key_rows = self._keys
        ef, m = int(self._param("insert_ef")), self._m
        run_ranges(lambda a, b: [gk.insert_nodes(key_rows[self._key_head(g), base:], self._adj[g], self._entries[g],
                                                 lo, hi, ef, m) for g in range(a, b)],
                   self.num_graphs, self.num_graphs, "search")
        self._count = hi

    def _reserve(self, needed: int) -> None:
        cap = self._adj.shape[1]
        if needed <= cap:
            return
        # rows are written -1 in full (resident at once): a long session's decode adds grow them by an eighth
        new_cap = max(needed, cap + max(cap // 8, 1024))
        if self._mode != "session":
            keys = np.zeros((self._keys.shape[0], new_cap, self._keys.shape[2]), dtype=self._keys.dtype)
            keys[:, : self._count] = self._keys[:, : self._count]
            self._keys = keys
        adj = np.empty((self._adj.shape[0], new_cap, self._adj.shape[2]), dtype=np.int32)
        hugepages.advise(adj)  # before the first write: searches read rows at random
        adj.fill(-1)
        adj[:, : self._count] = self._adj[:, : self._count]
        self._adj = adj

    # --------------------------------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str] | None = None,
               stored: StoredKeys | None = None) -> SearchResult:
        hq = self.shape.num_query_heads
        if self._count == 0 or k == 0:
            return SearchResult(ids=torch.full((hq, k), -1, dtype=torch.int64))
        key_rows, base = self._key_rows(stored, self._count)
        id_base = 0 if stored is None else stored.base
        ids = np.empty((hq, k), dtype=np.int64)  # every entry written by the kernels (-1 padded)
        scores = np.empty((hq, k), dtype=np.float32)
        ef = max(int(self._param("ef", params)), k)
        q = np.ascontiguousarray(queries.float().numpy())
        key_of, graph_of = self._heads
        touched = np.zeros(hq, dtype=np.int64)
        threads = int(self._param("threads", params)) or min(hq, parallel.CORES)
        prefetch = self._param("prefetch", params) != "0"
        expand = self._expand(params)
        group = self._search_group(params)
        searches = hq // group

        width, n_entries = self._adj.shape[2], self._entries.shape[1]

        def rows(lo: int, hi: int) -> None:
            visited, heaps = _search_scratch(self._count, 1, ef, n_entries, width, group)
            gk.search_rows(key_rows, base, self._adj, self._entries, q, key_of, graph_of, self._count, ef, group, lo,
                           hi, id_base, ids, scores, touched, visited[0], prefetch, expand, *(a[0] for a in heaps))

        schedule = self._param("schedule", params)
        if schedule in ("auto", "region") and parallel.enabled() and threads > 1:
            team = parallel.threads(threads, max(1, int(self._param("chunk", params))))
            visited, heaps = _search_scratch(self._count, team, ef, n_entries, width, group)
            with parallel.timed():
                gk.search_rows_parallel(key_rows, base, self._adj, self._entries, q, key_of, graph_of, self._count,
                                        ef, group, id_base, ids, scores, touched, visited, prefetch, expand, *heaps)
        elif schedule == "ranges":
            run_ranges(rows, searches, threads, "search")
        else:
            run_claimed(rows, searches, threads, "search")
        # (touched off: summing would be one more op per call, and serving does not read it)
        keys_touched = round(int(touched.sum()) / hq) if self._param("touched", params) != "off" else 0
        return SearchResult(ids=torch.from_numpy(ids), keys_touched=keys_touched, scores=torch.from_numpy(scores),
                            scores_from=torch.bfloat16 if key_rows.dtype == np.uint16 else torch.float32,
                            ranked=True, id_base=id_base)

    def search_attend(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str],
                      stored: StoredKeys, values: torch.Tensor, tails: list[tuple[int, int]],
                      into: AttendSlots | None = None, past: PastQueries | None = None) -> Attended | None:
        """The whole decode Retrieve as one parallel region (gk.search_attend_parallel, with past queries
        gk.search_attend_past_parallel): for a graph reading the session's bf16/float32 store, one head per search
        (group 1), with no work counter (touched=off), fuse=1 (or current, without past queries) and the region
        schedule."""
        fuse = self._param("fuse", params)
        if (self._mode != "session" or self._count == 0 or k == 0 or not parallel.enabled()
                or fuse == "0" or (past is not None and fuse == "current") or self._param("touched", params) != "off"
                or self._search_group(params) != 1 or self._param("schedule", params) not in ("auto", "region")
                or not supported(values) or values.dtype != stored.keys.dtype):
            return None
        hq, d = self.shape.num_query_heads, self.shape.head_dim
        key_rows, base = self._key_rows(stored, self._count)
        ef = max(int(self._param("ef", params)), k)
        threads = int(self._param("threads", params)) or min(hq, parallel.CORES)
        team = parallel.threads(threads, max(1, int(self._param("chunk", params))))
        visited, (cd, ci, rd, ri, _, _, fresh) = _search_scratch(self._count, team, ef, self._entries.shape[1],
                                                                 self._adj.shape[2])
        weights, row = _attend_scratch(team, k, d)
        # torch tensors made before the region: the first torch op after it would run with cold caches
        if into is None:
            ids = torch.empty((hq, k), dtype=torch.int64)
            into = (AttendSlots(ids=ids, output=torch.empty((hq, d)), lse=torch.empty(hq)) if past is None
                    else packed_slots(ids, torch.empty((past.queries.shape[0] + 1, hq, d + 1))))
        scores, counts = _scratch_rows(hq, k)
        key_of, graph_of = self._heads
        search = (key_rows, store_array(values), base, self._adj, self._entries,
                  np.ascontiguousarray(queries.float().numpy()), key_of, graph_of, self._count, ef,
                  np.array(tails, dtype=np.int64).reshape(-1, 2), float(scale), into.ids.numpy(), scores)
        pipeline = (self._param("prefetch", params) != "0", self._expand(params))
        if past is None:
            with parallel.timed():
                gk.search_attend_parallel(*search, into.output.numpy(), into.lse.numpy(), counts, visited, *pipeline,
                                          cd, ci, rd, ri, fresh, weights, row)
            return Attended(ids=into.ids, output=into.output, lse=into.lse, count=int(counts[0]))
        packed = into.packed
        count = past.queries.shape[0]
        if packed is None or packed.shape[0] != count + 1:
            raise ValueError("past queries' results go to a packed block of P + 1 rows (index.base.packed_slots)")
        seen, bound = seen_arrays(count, hq, past.seen_ids, past.seen_from)
        scratch = _past_scratch(team, count, seen.shape[2], k, d)
        with parallel.timed():
            gk.search_attend_past_parallel(*search, counts, np.ascontiguousarray(past.queries.numpy()), seen, bound,
                                           packed.numpy(), np.empty(hq), visited, *pipeline, cd, ci, rd, ri, fresh,
                                           scratch)
        return Attended(ids=into.ids, output=into.output, lse=into.lse, count=int(counts[0]),
                        past_output=into.past_output, past_lse=into.past_lse, packed=packed)

    # ---------------------------------------------------------------------------------- bookkeeping
    @property
    def count(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """The key copy, if the index keeps one, the adjacency rows and the entry points."""
        return int(self._keys.nbytes + self._adj.nbytes + self._entries.nbytes)

    @property
    def reads_session(self) -> bool:
        """Whether searches read the session's own keys (no copy)."""
        return self._mode == "session"

    def to_bytes(self) -> bytes:
        n = self._count
        meta = {"kind": self.kind, "count": n, "params": self.params}
        arrays = {"adj": torch.from_numpy(np.ascontiguousarray(self._adj[:, :n])),
                  "entries": torch.from_numpy(self._entries)}
        if self._mode != "session":
            arrays["keys"] = _keys_tensor(np.ascontiguousarray(self._keys[:, :n]))
        return pack(meta, arrays)

    @classmethod
    def from_bytes(cls, shape: IndexShape, params: dict[str, str], data: bytes) -> GraphIndex:
        meta, arrays = unpack(data)
        if meta.get("kind") != cls.kind:
            raise ValueError(f"not a {cls.kind} index blob")
        index = cls(shape, {**meta.get("params", {}), **params})
        adj = arrays["adj"].numpy()
        if "keys" in arrays:
            keys = _keys_array(arrays["keys"])
            index._mode = "bf16" if keys.dtype == np.uint16 else "fp32"
        else:  # the blob of an index that reads the session's keys
            keys = np.zeros((shape.num_kv_heads, 0, shape.head_dim), dtype=np.uint16)
            index._mode = "session"
        if adj.shape[0] != index.num_graphs or keys.shape[0] != shape.num_kv_heads:
            raise ValueError("index blob does not match the shape")
        index._adj = np.ascontiguousarray(adj, dtype=np.int32)
        index._keys = keys
        index._entries = np.ascontiguousarray(arrays["entries"].numpy(), dtype=np.int64)
        index._count = int(meta["count"])
        return index


def _keys_tensor(keys: np.ndarray) -> torch.Tensor:
    if keys.dtype == np.uint16:
        return torch.from_numpy(keys.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(keys)


def _keys_array(keys: torch.Tensor) -> np.ndarray:
    """A stored key tensor back to the kernels' array (float32 blobs of older versions load as they are)."""
    if keys.dtype == torch.bfloat16:
        return np.ascontiguousarray(keys.view(torch.int16).numpy().view(np.uint16))
    return np.ascontiguousarray(keys.numpy(), dtype=np.float32)


_SCRATCH = threading.local()


def _past_scratch(team: int, count: int, seen_width: int, k: int, d: int) -> tuple:
    """retro.past_scratch for `team` threads, kept per calling thread while the shapes stay the same (a decode's
    retro steps all have them)."""
    key = (team, count, seen_width, k, d)
    kept = getattr(_SCRATCH, "past", None)
    if kept is None or kept[0] != key:
        kept = _SCRATCH.past = (key, past_scratch(team, count, seen_width, k, d))
    return kept[1]


def _search_scratch(count: int, rows: int, ef: int, entries: int, width: int, group: int = 1
                    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """This thread's scratch for `rows` concurrent searches (row t for thread t of a parallel region; the
    worker-pool path uses row 0), kept between calls: visited bitsets [rows, >= visited_words(count)] uint64
    (each search clears its own) and the heaps of gk.search_scratch."""
    visited = getattr(_SCRATCH, "visited", None)
    if visited is None or visited.shape[0] < rows or visited.shape[1] < gk.visited_words(count):
        # room to grow: decode adds one key per step, and each would otherwise reallocate
        visited = np.zeros((rows, gk.visited_words(max(count + count // 8, 1024))), np.uint64)
        _SCRATCH.visited = visited
    heaps = getattr(_SCRATCH, "heaps", None)
    if heaps is None or heaps[0] != (ef, entries, width, group) or heaps[1][0].shape[0] < rows:
        heaps = ((ef, entries, width, group), gk.search_scratch(rows, ef, entries, width, group))
        _SCRATCH.heaps = heaps
    return visited, heaps[1]


def _scratch_rows(heads: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's per-call scratch of a fused search: scores float32 [heads, k] and valid counts int64
    [heads], kept between calls."""
    scratch = getattr(_SCRATCH, "rows", None)
    if scratch is None or scratch[0].shape != (heads, k):
        scratch = (np.empty((heads, k), np.float32), np.empty(heads, np.int64))
        _SCRATCH.rows = scratch
    return scratch


def _attend_scratch(rows: int, k: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's attention scratch for a fused region of `rows` threads: softmax weights float64
    [rows, >= k] and a widened value row float32 [rows, head_dim], kept between calls."""
    scratch = getattr(_SCRATCH, "attend", None)
    if scratch is None or scratch[0].shape[0] < rows or scratch[0].shape[1] < k or scratch[1].shape[1] != head_dim:
        scratch = (np.empty((rows, k)), np.empty((rows, head_dim), np.float32))
        _SCRATCH.attend = scratch
    return scratch


def _subsample(total: int, count: int) -> torch.Tensor:
    """Evenly spaced indices: count of 0..total-1 (all when count >= total)."""
    if count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def warmup() -> None:
    """Compile (or load from the numba cache) every kernel on a tiny graph, e.g. once at daemon start."""
    shape = IndexShape(num_kv_heads=1, num_query_heads=1, head_dim=4)
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 302, 4, generator=gen)
    queries = torch.randn(1, 8, 4, generator=gen)
    for dtype in _SESSION_DTYPES:  # reading a bf16 / float32 session store (the daemon's case)
        stored = StoredKeys(keys.to(dtype), 1)
        index = GraphIndex(shape, {"threads": "1"})
        index.build(stored.keys[:, 1:300], None, BuildHints(queries=queries), stored=stored)
        index.add(stored.keys[:, 300:], None, stored=stored)
        index.search(queries[0], 5, 1.0, stored=stored)
        if parallel.enabled():
            index.search(queries[0], 5, 1.0, {"threads": "2"}, stored=stored)
