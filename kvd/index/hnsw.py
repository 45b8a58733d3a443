"""HNSW over the keys (hnswlib, inner product): the off-the-shelf baseline.

One hnswlib index per KV head, space 'ip' (distance 1 - q.k); the query heads of a GQA group search their KV
head's index. Built over keys only, it suffers from the query/key out-of-distribution gap (RESEARCH.md §1):
decode queries are far from the keys, the greedy search stalls in local optima and needs a wide beam.

Params (strings): M (16), ef_construction (200), ef (200, search beam; raised to k when smaller), threads
(hnswlib build/search threads, default all cores), touched ("exact" | "off", default "exact").

keys_touched: hnswlib does not report its distance computations, so with touched="exact" every query is
replayed by `graph_kernels.beam_search` -- the same best-first algorithm, compiled -- over hnswlib's own
level-0 graph, started from the node hnswlib's greedy upper-layer descent reaches (replayed in numpy); the
count is the number of keys scored. The replay costs about one more search; touched="off" skips it and
reports 0. ef is not saved by hnswlib (it loads as 10): it is a param here and set on every search.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import hnswlib
import numpy as np
import torch

from kvd.index.base import BuildHints, IndexShape, KeyIndex, SearchResult, StoredKeys
from kvd.index.wave_io import pack, unpack

DEFAULTS = {"M": "16", "ef_construction": "200", "ef": "200", "touched": "exact"}


def _param(params: dict[str, str], name: str) -> str:
    return params.get(name, DEFAULTS.get(name, ""))


@dataclass
class HnswStructure:
    """hnswlib's graph in label space, for replaying searches: level-0 adjacency int32 [n, 2M] (-1 padded),
    upper-level links {(label, level): labels}, the vectors by label, the entry label and the top level."""

    adj: np.ndarray
    upper: dict[tuple[int, int], np.ndarray]
    vectors: np.ndarray
    entry: int
    max_level: int


def hnsw_structure(index: hnswlib.Index) -> HnswStructure:
    """Read hnswlib's graph out of its pickle state (the level-0 block and the upper link lists)."""
    st = index.__getstate__()[0]
    n, dim, width = st["cur_element_count"], st["dim"], st["max_M0"]
    block = st["data_level0"][: n * st["size_data_per_element"]].view(np.uint32).reshape(n, -1)
    labels = block[:, st["label_offset"] // 4].astype(np.int64)    # low word of the uint64 label
    counts = (block[:, 0] & 0xFFFF).astype(np.int64)
    links = block[:, 1:1 + width].astype(np.int64)
    links[np.arange(width)[None, :] >= counts[:, None]] = -1
    adj = np.full((n, width), -1, dtype=np.int32)
    adj[labels] = np.where(links >= 0, labels[links.clip(min=0)], -1)
    vectors = np.empty((n, dim), dtype=np.float32)
    off = st["offset_data"] // 4
    vectors[labels] = block[:, off:off + dim].view(np.float32)
    upper = _upper_links(st, labels)
    return HnswStructure(adj, upper, vectors, int(labels[st["enterpoint_node"]]), int(st["max_level"]))


def _upper_links(st: dict, labels: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    words = st["size_links_per_element"] // 4
    lists = st["link_lists"].view(np.uint32)
    levels = st["element_levels"][: labels.shape[0]]
    upper: dict[tuple[int, int], np.ndarray] = {}
    offset = 0
    for internal in np.nonzero(levels > 0)[0]:
        for level in range(1, int(levels[internal]) + 1):
            row = lists[offset: offset + words]
            offset += words
            upper[(int(labels[internal]), level)] = labels[row[1:1 + (row[0] & 0xFFFF)].astype(np.int64)]
    return upper


def replay_touched(s: HnswStructure, query: np.ndarray, ef: int) -> int:
    """Distance computations of hnswlib's search for one query (greedy upper layers + level-0 beam)."""
    from kvd.index import graph_kernels as gk

    cur = s.entry
    cur_d = float(s.vectors[cur] @ query)
    touched = 1
    for level in range(s.max_level, 0, -1):
        changed = True
        while changed:
            changed = False
            links = s.upper.get((cur, level))
            if links is None or links.size == 0:
                break
            touched += int(links.size)
            scores = s.vectors[links] @ query
            best = int(np.argmax(scores))
            if scores[best] > cur_d:
                cur, cur_d, changed = int(links[best]), float(scores[best]), True
    n = s.vectors.shape[0]
    visited = np.zeros(gk.visited_words(n), dtype=np.uint64)
    _, _, base = gk.beam_search(s.vectors, s.adj, np.array([cur], dtype=np.int64), query, ef, n, visited)
    return touched + int(base)


class HnswIndex(KeyIndex):
    kind = "hnsw"

    def __init__(self, shape: IndexShape, params: dict[str, str] | None = None) -> None:
        super().__init__(shape, params)
        self._heads: list[hnswlib.Index] = []
        self._structures: list[HnswStructure | None] = []
        self._count = 0

    # ------------------------------------------------------------------------------------------ build
    def _threads(self) -> int:
        return int(self.params.get("threads", os.cpu_count() or 1))

    def _new_head(self, capacity: int) -> hnswlib.Index:
        index = hnswlib.Index(space="ip", dim=self.shape.head_dim)
        index.init_index(max_elements=max(capacity, 1), M=int(_param(self.params, "M")),
                         ef_construction=int(_param(self.params, "ef_construction")))
        return index

    def build(self, keys: torch.Tensor, values: torch.Tensor | None, hints: BuildHints | None,
              stored: StoredKeys | None = None) -> None:
        self._check_keys(keys)
        n = keys.shape[1]
        self._heads = [self._new_head(n) for _ in range(self.shape.num_kv_heads)]
        self._structures = [None] * self.shape.num_kv_heads
        self._count = 0
        self._append(keys)

    def add(self, keys: torch.Tensor, values: torch.Tensor | None, stored: StoredKeys | None = None) -> None:
        self._check_keys(keys)
        if not self._heads:
            self.build(keys, values, None)
            return
        needed = self._count + keys.shape[1]
        for index in self._heads:
            if needed > index.get_max_elements():
                index.resize_index(max(needed, 2 * index.get_max_elements()))
        self._append(keys)

    def _append(self, keys: torch.Tensor) -> None:
        n_new = keys.shape[1]
        if n_new == 0:
            return
        ids = np.arange(self._count, self._count + n_new)
        for h, index in enumerate(self._heads):
            data = np.ascontiguousarray(keys[h].float().numpy())
            index.add_items(data, ids, num_threads=self._threads())
            self._structures[h] = None
        self._count += n_new

    def _check_keys(self, keys: torch.Tensor) -> None:
        if keys.dim() != 3 or keys.shape[0] != self.shape.num_kv_heads or keys.shape[2] != self.shape.head_dim:
            raise ValueError(f"keys must be [{self.shape.num_kv_heads}, n, {self.shape.head_dim}]")

    # ----------------------------------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str] | None = None,
               stored: StoredKeys | None = None) -> SearchResult:
        p = {**self.params, **(params or {})}
        hq, g = self.shape.num_query_heads, self.shape.group_size
        ids = torch.full((hq, k), -1, dtype=torch.int64)
        kk = min(k, self._count)
        if kk == 0:
            return SearchResult(ids=ids)
        ef = max(int(_param(p, "ef")), kk)
        q = np.ascontiguousarray(queries.float().numpy())
        touched = 0
        for h, index in enumerate(self._heads):
            rows = q[h * g:(h + 1) * g]
            index.set_ef(ef)
            ids[h * g:(h + 1) * g, :kk] = torch.from_numpy(self._knn(index, h, rows, kk).astype(np.int64))
            if _param(p, "touched") == "exact":
                touched += sum(replay_touched(self._structure(h), row, ef) for row in rows)
        return SearchResult(ids=ids, keys_touched=round(touched / hq))

    def _knn(self, index: hnswlib.Index, head: int, rows: np.ndarray, k: int) -> np.ndarray:
        try:
            labels, _ = index.knn_query(rows, k=k, num_threads=min(len(rows), self._threads()))
            return labels
        except RuntimeError:  # fewer than k reachable: fall back to an exact scan of this head
            vectors = self._structure(head).vectors
            return np.argsort(-(rows @ vectors.T), axis=1, kind="stable")[:, :k]

    def _structure(self, head: int) -> HnswStructure:
        s = self._structures[head]
        if s is None:
            s = hnsw_structure(self._heads[head])
            self._structures[head] = s
        return s

    # ----------------------------------------------------------------------------------- bookkeeping
    @property
    def count(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """hnswlib's whole footprint (its float32 copy of the keys included), plus replay caches."""
        total = sum(index.index_file_size() for index in self._heads)
        for s in self._structures:
            if s is not None:
                total += s.adj.nbytes + s.vectors.nbytes
        return total

    def to_bytes(self) -> bytes:
        arrays: dict[str, torch.Tensor] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for h, index in enumerate(self._heads):
                path = os.path.join(tmp, f"{h}.bin")
                index.save_index(path)
                with open(path, "rb") as f:
                    arrays[f"head{h}"] = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        meta = {"kind": self.kind, "count": self._count, "heads": len(self._heads), "params": self.params}
        return pack(meta, arrays)

    @classmethod
    def from_bytes(cls, shape: IndexShape, params: dict[str, str], data: bytes) -> HnswIndex:
        meta, arrays = unpack(data)
        if meta.get("kind") != cls.kind:
            raise ValueError(f"not an {cls.kind} index blob")
        index = cls(shape, {**meta.get("params", {}), **params})
        index._count = int(meta["count"])
        with tempfile.TemporaryDirectory() as tmp:
            for h in range(int(meta["heads"])):
                path = os.path.join(tmp, f"{h}.bin")
                with open(path, "wb") as f:
                    f.write(arrays[f"head{h}"].numpy().tobytes())
                head = hnswlib.Index(space="ip", dim=shape.head_dim)
                head.load_index(path, max_elements=max(index._count, 1))
                index._heads.append(head)
        index._structures = [None] * len(index._heads)
        return index
