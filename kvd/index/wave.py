"""Wave index (RetroInfer, RESEARCH.md §2): clustered keys with a retrieval zone and an estimation zone.

Build, per KV head: k-means over the keys in segments of `segment` tokens, ~`cluster_size` tokens per
cluster, all heads and segments batched (wave_kmeans); `block` > 0 makes it two-level (coarse clusters of
~block tokens over each segment, then fine clusters within blocks of that order). The clustering space is
`metric` (wave_build): "query" (default; the prefill queries' second moment projected to `proj_dim`
directions, from BuildHints.queries), "euclid" (the fallback without hints) or "spherical" (RetroInfer).
Stored per cluster: the mean key (un-centred, key space), the value sum, the size and the RMS radius; keys
are kept in cluster order (CSR offsets into keys/token_ids; `key_dtype` may make them 16-bit), so a
cluster's tokens are one contiguous block.

Search, per decode step: score every cluster by q.mean_key; rank clusters per query head (`ranking=head`)
or per KV head over its group's summed scores (`ranking=group`, RetroInfer), with an optimism bonus
`radius_weight * |q| * radius / sqrt(d)`.
- retrieval zone: the top `retrieval_fraction` of clusters (at least enough to hold ~k tokens); all their
  tokens and every pending (not yet clustered) token are scored exactly.
- ids (`leftover`): `fold` (default) returns the exact top-k by decreasing score and adds the other scored
  tokens to the estimate with their exact score and their cluster's mean value; `ids` returns every scored
  token, the exact top-k first (sorted), then the others unsorted (k is a floor: the caller must attend
  exactly over all of them, as RetroInfer attends its whole retrieval zone); `drop` returns the top-k and
  forgets the rest.
- estimation zone: the next `estimation_fraction` of clusters (default: all the others); cluster i
  contributes log-weight log(size_i) + scale * q.mean_key_i with value vsum_i / size_i, returned as a
  partial attention (output, lse) that the caller merges with the exact attention over the ids by
  log-sum-exp. It covers exactly the keys not returned as ids (with `drop`: minus the dropped ones).
New keys (add) go to a pending buffer that every search scores exactly; once it holds `pending_threshold`
tokens they are clustered in the build's space and appended as new clusters.

keys_touched: scores computed per query head (averaged over query heads, as the flat index reports
`count`): clusters + retrieval-zone tokens + pending tokens; the fraction touched is keys_touched / count.
With 16-token clusters the cluster scan alone is 1/16 = 6.25% of the keys.

Defaults and why (bench.qkdata realistic and MiniLM sets, 128K keys, sink 128 + window 512 exact, top-100;
err = relative L2 error of the merged attention output against full attention):
- metric=query: recall@100 0.866 / err 0.031 on realistic vs euclid 0.798 / 0.027 and spherical
  (RetroInfer) 0.678 / 0.092 (leftover=fold); on MiniLM 0.965 / 0.123 vs euclid 0.952 / 0.121 and
  spherical 0.954 / 0.123. Recall follows the metric; the error much less.
- ranking=head: realistic recall 0.866 vs 0.693 with group-summed scores (err 0.031 vs 0.073); equal on
  MiniLM (one query head per KV head).
- estimation_fraction=1: err 0.031 vs 0.035 at RetroInfer's 23% vs 0.051 with no estimate (realistic);
  MiniLM 0.055 vs 0.316 with no estimate. The estimate is one matmul over all clusters either way.
- leftover: realistic 0.0309 (ids) / 0.0313 (fold) / 0.041 (drop); MiniLM 0.055 / 0.123 / 0.257. `ids` is
  the most accurate but makes the caller attend ~1.7K ids per head at 128K instead of k, and a caller that
  cuts the ids back to k (IndexSlot.search re-ranks to k) turns it into `drop`: hence `fold` by default.
- radius_weight=1: realistic recall 0.866 vs 0.827 without the bonus.
- segment=8192 one-level: realistic 0.866 / 0.031 vs two-level (block 4096 over the whole context)
  0.830 / 0.053; MiniLM 0.965 / 0.055 vs 0.991 / 0.031 -- the sets disagree; two-level builds faster.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from kvd.index import wave_search as ws
from kvd.index.base import BuildHints, IndexShape, KeyIndex, SearchResult, StoredKeys
from kvd.index.wave_build import (
    METRICS,
    Clusters,
    Space,
    cluster_block,
    concat,
    empty_clusters,
    make_space,
    summarize,
)
from kvd.index.wave_io import pack, unpack

_RANKINGS = ("group", "head")
_LEFTOVERS = ("ids", "fold", "drop")
_KMEANS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_KEY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class WaveParams:
    cluster_size: int = 16
    segment: int = 8192
    block: int = 0
    iters: int = 4
    metric: str = "query"
    proj_dim: int = 32
    retrieval_fraction: float = 0.018
    estimation_fraction: float = 1.0
    radius_weight: float = 1.0
    ranking: str = "head"
    leftover: str = "fold"
    pending_threshold: int = 1024
    kmeans_dtype: str = "float32"
    key_dtype: str = "float32"
    seed: int = 0

    @classmethod
    def parse(cls, params: dict[str, str] | None, base: WaveParams | None = None,
              strict: bool = True) -> WaveParams:
        """Typed params from a string dict; keys absent keep `base`'s values. strict: reject unknown keys."""
        base = base or cls()
        params = params or {}
        names = {f.name for f in fields(cls)}
        if strict and (unknown := set(params) - names):
            raise ValueError(f"unknown wave index params: {sorted(unknown)}")
        kw: dict[str, Any] = {n: type(getattr(base, n))(v) for n, v in params.items() if n in names}
        out = replace(base, **kw)
        out.validate()
        return out

    def validate(self) -> None:
        if self.cluster_size < 1 or self.segment < self.cluster_size or self.iters < 0 or self.proj_dim < 1:
            raise ValueError("need cluster_size >= 1, segment >= cluster_size, iters >= 0, proj_dim >= 1")
        if self.block and self.block < self.cluster_size:
            raise ValueError("block must be 0 (one level) or >= cluster_size")
        if not (0.0 <= self.retrieval_fraction <= 1.0 and 0.0 <= self.estimation_fraction <= 1.0):
            raise ValueError("retrieval_fraction and estimation_fraction must lie in [0, 1]")
        if self.pending_threshold < 1:
            raise ValueError("pending_threshold must be >= 1")
        if self.metric not in METRICS or self.ranking not in _RANKINGS or self.leftover not in _LEFTOVERS:
            raise ValueError(f"metric in {METRICS}, ranking in {_RANKINGS}, leftover in {_LEFTOVERS}")
        if self.kmeans_dtype not in _KMEANS_DTYPES or self.key_dtype not in _KEY_DTYPES:
            raise ValueError(f"kmeans_dtype in {sorted(_KMEANS_DTYPES)}, key_dtype in {sorted(_KEY_DTYPES)}")

    def as_strings(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class _State:
    """Everything search() reads, replaced as a whole by add(): a search that took one snapshot never sees
    new clusters with the old pending buffer (or the reverse), so add() may run beside search()."""

    cl: Clusters
    prep: ws.Prepared
    pend_k: torch.Tensor    # float32 [Hkv, P, d]: added keys not yet clustered (local ids follow cl's)
    pend_v: torch.Tensor

    @classmethod
    def of(cls, cl: Clusters, pend_k: torch.Tensor, pend_v: torch.Tensor) -> _State:
        return cls(cl, ws.prepare(cl), pend_k, pend_v)


class WaveIndex(KeyIndex):
    kind = "wave"

    def __init__(self, shape: IndexShape, params: dict[str, str] | None = None) -> None:
        super().__init__(shape, params)
        self._p = WaveParams.parse(self.params)
        h, d = shape.num_kv_heads, shape.head_dim
        self._space = Space("euclid", torch.zeros(h, d))
        self._st = self._empty_state()
        self._blocks = 0

    # ----------------------------------------------------------------------------------------- build/add
    def build(self, keys: torch.Tensor, values: torch.Tensor | None, hints: BuildHints | None,
              stored: StoredKeys | None = None) -> None:
        keys, values = self._check_kv(keys, values)
        d = self.shape.head_dim
        queries = hints.queries if hints is not None else None
        if queries is not None and (queries.dim() != 3 or queries.shape[0] != self.shape.num_query_heads
                                    or queries.shape[2] != d):
            raise ValueError(f"hint queries must be [{self.shape.num_query_heads}, m, {d}]")
        self._space = make_space(self._p.metric, keys, queries, self._p.proj_dim)
        self._st = self._empty_state()
        self._blocks = 0
        if keys.shape[1]:
            self._st = _State.of(self._cluster(keys, values), self._st.pend_k, self._st.pend_v)

    def build_from_labels(self, keys: torch.Tensor, values: torch.Tensor | None, labels: torch.Tensor,
                          hints: BuildHints | None = None) -> None:
        """build() with the clustering done elsewhere: labels int [Hkv, n], cluster ids 0..C-1 numbered alike
        on every head (wave_kmeans.segment_labels on CUDA tensors gives them on the GPU during prefill, about
        40 ms a layer at 128K keys on an H100 against ~2 s here on 16 cores). hints: for later appends."""
        keys, values = self._check_kv(keys, values)
        h, n = keys.shape[:2]
        labels = labels.to("cpu", torch.int64)
        if labels.shape != (h, n) or (n and int(labels.min()) < 0):
            raise ValueError(f"labels must be int [{h}, {n}] with cluster ids >= 0")
        self.build(keys[:, :0], values[:, :0], hints)
        self._space = make_space(self._p.metric, keys, hints.queries if hints else None, self._p.proj_dim)
        if n:
            cl = summarize(keys, values, labels, int(labels.max()) + 1, 0, _KEY_DTYPES[self._p.key_dtype])
            self._st = _State.of(cl, self._st.pend_k, self._st.pend_v)
            self._blocks = 1

    def add(self, keys: torch.Tensor, values: torch.Tensor | None, stored: StoredKeys | None = None) -> None:
        keys, values = self._check_kv(keys, values)
        st = self._st
        pend_k, pend_v = torch.cat([st.pend_k, keys], 1), torch.cat([st.pend_v, values], 1)
        thr = self._p.pending_threshold
        if pend_k.shape[1] < thr:
            self._st = replace(st, pend_k=pend_k, pend_v=pend_v)
            return
        cut = pend_k.shape[1] // thr * thr
        new = self._cluster(pend_k[:, :cut], pend_v[:, :cut])
        self._st = _State.of(concat(st.cl, new), pend_k[:, cut:].clone(), pend_v[:, cut:].clone())

    def _check_kv(self, keys: torch.Tensor, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if values is None:
            raise ValueError("the wave index needs values (its estimation zone sums them)")
        h, d = self.shape.num_kv_heads, self.shape.head_dim
        if keys.dim() != 3 or keys.shape[0] != h or keys.shape[2] != d or values.shape != keys.shape:
            raise ValueError(f"keys/values must be [{h}, n, {d}], got {tuple(keys.shape)}/{tuple(values.shape)}")
        return keys.float().contiguous(), values.float().contiguous()

    def _empty_state(self) -> _State:
        h, d = self.shape.num_kv_heads, self.shape.head_dim
        cl = empty_clusters(h, d, _KEY_DTYPES[self._p.key_dtype])
        return _State.of(cl, torch.zeros(h, 0, d), torch.zeros(h, 0, d))

    def _cluster(self, keys: torch.Tensor, values: torch.Tensor) -> Clusters:
        """Clusters of keys that follow the current clusters (local ids after theirs)."""
        p = self._p
        gen = torch.Generator().manual_seed(p.seed * 1_000_003 + self._blocks)
        new = cluster_block(keys, values, self._space, self._st.cl.num_tokens, p.cluster_size, p.segment,
                            p.block, p.iters, gen, _KMEANS_DTYPES[p.kmeans_dtype], _KEY_DTYPES[p.key_dtype])
        self._blocks += 1
        return new

    @property
    def _cl(self) -> Clusters:
        return self._st.cl

    @property
    def _pend_k(self) -> torch.Tensor:
        return self._st.pend_k

    # ------------------------------------------------------------------------------------------- search
    def zone_sizes(self, k: int, p: WaveParams | None = None, st: _State | None = None) -> tuple[int, int]:
        """(retrieval clusters, estimation clusters) per unit for a top-k search."""
        p, st = p or self._p, st or self._st
        c = st.cl.num_clusters
        if c == 0:
            return 0, 0
        r = min(c, max(math.ceil(p.retrieval_fraction * c), math.ceil(k / st.prep.avg_size)))
        return r, min(c - r, math.ceil(p.estimation_fraction * c))

    def search(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str] | None = None,
               stored: StoredKeys | None = None) -> SearchResult:
        p = WaveParams.parse(params, self._p, strict=False) if params else self._p
        hkv, g, d = self.shape.num_kv_heads, self.shape.group_size, self.shape.head_dim
        if queries.shape != (self.shape.num_query_heads, d):
            raise ValueError(f"queries must be [{self.shape.num_query_heads}, {d}], got {tuple(queries.shape)}")
        group = p.ranking == "group"
        q = queries.float().reshape(hkv, g, d)
        st = self._st
        cl, prep = st.cl, st.prep
        cs = ws.centroid_scores(q, cl, prep)                                              # [Hkv, G, C]
        rank = ws.rank_scores(q, cs, prep, group, p.radius_weight)                        # [U, C]
        r, e = self.zone_sizes(k, p, st)
        top, mask = ws.select_zones(rank, r, e)
        unit_kv = torch.arange(rank.shape[0]) // (1 if group else g)
        pos, clus = ws.zone_positions(cl.offsets, unit_kv, top)
        cand = ws.score_candidates(q, cl, st.pend_k, pos, clus, group)
        order, ids = ws.choose(cand, k, all_scored=p.leftover == "ids")
        fold = (ws.leftover_scores(cand, order), cand, st.pend_v) if p.leftover == "fold" else None
        est = ws.estimate(cs, top, mask, scale, cl, fold)
        touched = cl.num_clusters + round(cand.scored / self.shape.num_query_heads)
        return SearchResult(ids=ids, estimate=est, keys_touched=touched)

    # ----------------------------------------------------------------------------------- bookkeeping
    @property
    def count(self) -> int:
        st = self._st
        return st.cl.num_tokens + st.pend_k.shape[1]

    @property
    def num_clusters(self) -> int:
        return self._cl.num_clusters

    @property
    def metric(self) -> str:
        """The clustering space actually used ("query" falls back to "euclid" without hint queries)."""
        return self._space.metric

    def nbytes(self) -> int:
        """Bytes held beyond the keys (the cluster-ordered key copy and the pending keys are not counted)."""
        st, sp = self._st, self._space
        cl = st.cl
        tensors = [sp.mean, cl.centroids, cl.vs1, cl.radius, cl.offsets, cl.token_ids, st.pend_v]
        if sp.proj is not None:
            tensors.append(sp.proj)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_bytes(self) -> bytes:
        meta = {"kind": self.kind, "version": _FORMAT_VERSION, "params": asdict(self._p),
                "shape": [self.shape.num_kv_heads, self.shape.num_query_heads, self.shape.head_dim],
                "blocks": self._blocks, "metric": self._space.metric}
        st = self._st
        cl = st.cl
        arrays = {"mean": self._space.mean, "centroids": cl.centroids, "vs1": cl.vs1, "radius": cl.radius,
                  "offsets": cl.offsets, "token_ids": cl.token_ids, "keys": cl.keys,
                  "pend_k": st.pend_k, "pend_v": st.pend_v}
        if self._space.proj is not None:
            arrays["proj"] = self._space.proj
        return pack(meta, arrays)

    @classmethod
    def from_bytes(cls, shape: IndexShape, params: dict[str, str], data: bytes) -> WaveIndex:
        meta, a = unpack(data)
        if meta.get("kind") != cls.kind or meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"not a wave index v{_FORMAT_VERSION}: {meta.get('kind')} v{meta.get('version')}")
        if meta["shape"] != [shape.num_kv_heads, shape.num_query_heads, shape.head_dim]:
            raise ValueError(f"shape mismatch: stored {meta['shape']}, given {shape}")
        p = WaveParams.parse(params, WaveParams(**meta["params"]))
        idx = cls(shape, p.as_strings())
        idx._space = Space(meta["metric"], a["mean"], a.get("proj"))
        cl = Clusters(a["centroids"], a["vs1"], a["radius"], a["offsets"], a["token_ids"], a["keys"])
        idx._st = _State.of(cl, a["pend_k"], a["pend_v"])
        idx._blocks = int(meta["blocks"])
        return idx
