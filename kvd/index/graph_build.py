"""Construction of one attention-aware key graph (RESEARCH.md §1), orchestrating graph_kernels in threads.

Steps for one graph (keys [n, d] float32, sampled queries' exact top-N key lists [S, N]):
1. projection: within each list every member takes the other members as candidates (nearest first by L2),
   RNG-pruned to `m` (list_edges);
2. union with reverse edges, re-pruned per node to `m` (prune_nodes);
3. entry points: the `n_entries` keys that occur in most lists (the sinks and other keys most queries
   want; the search scores them all first);
4. connectivity enhancement: every key beam-searches the graph with itself as the query (beam `enhance_ef`)
   and keeps up to `m` RNG-pruned supply neighbours; union of projection, supply and reverse-supply edges,
   re-pruned to 2m - 1 per node (enhance_nodes, prune_nodes);
5. keys nobody links to get an edge from the previous position (the free last slot of its row), so every
   key is reachable.
Cheaper variants (GraphParams): `pivots` limits step 1 to the first members of each list; `window` replaces
steps 1-2 by rank-window pairs of each list (members whose ranks differ by <= window), RNG-pruned per node;
enhance_ef=0 skips step 4.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from kvd.index import graph_kernels as gk
from kvd.workers import run_ranges


@dataclass(frozen=True)
class GraphParams:
    m: int = 32                 # degree of the projection and of the supply step; rows hold 2m
    enhance_ef: int = 32        # beam of the connectivity-enhancement searches (0: skip the step)
    n_entries: int = 128        # entry points scored by every search
    window: int = 0             # >0: project lists by rank windows (cheap) instead of every-member RNG
    enhance_entries: int = 1    # entry points of the enhancement searches (the most popular keys)
    pivots: int = 1 << 30       # list members that pivot (the first ones, by score)
    threads: int = 0            # worker ranges per step (0: one per core)

    @property
    def width(self) -> int:
        """Adjacency row width: 2m with the enhancement step (projection + supply edges); without it the
        projection's m plus the slot that links an orphan (half the memory of the fast-build preset's rows)."""
        return 2 * self.m if self.enhance_ef > 0 else self.m + 1

    def parts(self, total: int) -> int:
        t = self.threads or os.cpu_count() or 1
        return max(1, min(4 * t, total // 256 or 1))


def exact_topn(keys: torch.Tensor, queries: torch.Tensor, n_top: int, chunk: int = 1024) -> torch.Tensor:
    """Exact top-n key ids by inner product: keys [n, d], queries [s, d] -> int64 [s, min(n_top, n)]."""
    n_top = min(n_top, keys.shape[0])
    parts = [torch.topk(queries[i:i + chunk] @ keys.T, n_top, dim=1).indices
             for i in range(0, queries.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.empty(0, n_top, dtype=torch.int64)


def edges_of(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) int64 of the non-empty slots of an adjacency."""
    r, c = np.nonzero(adj >= 0)
    return r.astype(np.int64), adj[r, c].astype(np.int64)


def prune_union(keys: np.ndarray, src: np.ndarray, dst: np.ndarray, degree: int, pool_size: int,
                width: int, p: GraphParams) -> np.ndarray:
    """Per node: the union of its candidate edges, nearest first, RNG-pruned to `degree`, in rows of `width`."""
    n = keys.shape[0]
    indptr, nbrs = gk.csr(n, src.astype(np.int64), dst.astype(np.int64))
    adj = np.full((n, width), -1, dtype=np.int32)
    run_ranges(lambda lo, hi: gk.prune_nodes(keys, indptr, nbrs, degree, pool_size, lo, hi, adj), n, p.parts(n))
    return adj


def project_lists(keys: np.ndarray, lists: np.ndarray, p: GraphParams) -> np.ndarray:
    """Steps 1-2: the projected graph, rows of width m."""
    if p.window > 0:
        src, dst = gk.window_edges(lists, p.window)
        return prune_union(keys, src, dst, p.m, 4 * p.m, p.m, p)
    s, width = lists.shape
    out = np.full((s * width * p.m, 2), -1, dtype=np.int32)
    run_ranges(lambda lo, hi: gk.list_edges(keys, lists, p.m, p.pivots, lo, hi, out), s, p.parts(s))
    out = out[out[:, 0] >= 0].astype(np.int64)
    src = np.concatenate([out[:, 0], out[:, 1]])
    dst = np.concatenate([out[:, 1], out[:, 0]])
    return prune_union(keys, src, dst, p.m, 4 * p.m, p.m, p)


def popular_keys(lists: np.ndarray, n: int, count: int, keys: np.ndarray) -> np.ndarray:
    """The `count` keys found in most lists (ties: lower id); without lists, the key nearest the mean."""
    freq = np.bincount(lists[lists >= 0].astype(np.int64), minlength=n)
    ranked = np.argsort(-freq, kind="stable")
    chosen = ranked[: min(count, int((freq > 0).sum()))]
    if chosen.size == 0:
        chosen = np.array([int(np.argmin(((keys - keys.mean(0)) ** 2).sum(1)))])
    return chosen.astype(np.int64)


def enhance(keys: np.ndarray, proj: np.ndarray, entries: np.ndarray, p: GraphParams) -> np.ndarray:
    """Step 4: supply neighbours from self-searches, merged with the projection into rows of p.width."""
    n = keys.shape[0]
    if p.enhance_ef <= 0:
        adj = np.full((n, p.width), -1, dtype=np.int32)
        adj[:, : min(p.m, p.width - 1)] = proj[:, : p.width - 1]
        return adj
    supply = np.full((n, p.m), -1, dtype=np.int32)
    starts = entries[: max(1, p.enhance_entries)]
    run_ranges(lambda lo, hi: gk.enhance_nodes(keys, proj, starts, n, p.enhance_ef, p.m, lo, hi, supply),
               n, p.parts(n))
    src0, dst0 = edges_of(proj)
    src1, dst1 = edges_of(supply)
    src = np.concatenate([src0, src1, dst1])
    dst = np.concatenate([dst0, dst1, src1])
    return prune_union(keys, src, dst, p.width - 1, 3 * p.width, p.width, p)


def link_orphans(adj: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """Step 5: every key without an in-edge gets one from the previous position (its row keeps a free slot);
    key 0, if orphaned, joins the entry points. Returns the (possibly extended) entries."""
    n = adj.shape[0]
    indeg = np.bincount(adj[adj >= 0].astype(np.int64), minlength=n)
    indeg[entries] += 1
    orphans = np.nonzero(indeg == 0)[0]
    if orphans.size and orphans[0] == 0:
        entries = np.concatenate([entries, [0]])
        orphans = orphans[1:]
    if orphans.size:
        prev = orphans - 1
        slot = (adj[prev] >= 0).sum(1)
        adj[prev, slot] = orphans
    return entries


def build_graph(keys: np.ndarray, lists: np.ndarray, p: GraphParams) -> tuple[np.ndarray, np.ndarray]:
    """keys float32 [n, d], lists int [S, N] (-1 padded) -> (adjacency int32 [n, 2m], entry ids int64)."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int32)
    n = keys.shape[0]
    proj = project_lists(keys, lists, p)
    entries = popular_keys(lists, n, p.n_entries, keys)
    adj = enhance(keys, proj, entries, p)
    entries = link_orphans(adj, entries)
    return adj, entries
