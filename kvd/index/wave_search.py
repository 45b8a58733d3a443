"""Search steps of the wave index, as pure functions over its Clusters and pending buffer.

Shapes: Hkv KV heads, G query heads per group, Hq = Hkv * G, C clusters per KV head, d head dim. A "unit"
is what clusters are selected for: a KV head (ranking "group") or a query head (ranking "head").
Written for few passes over [Hkv, G, C]-sized tensors: at 128K keys the two matmuls over the clusters are
cheap and every extra elementwise pass costs about as much as one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvd.index.base import Estimate
from kvd.index.wave_build import Clusters


@dataclass
class Prepared:
    """Per-build constants of the search."""

    empty_bias: torch.Tensor    # float32 [Hkv, 1, C]: 0, or -inf for an empty cluster
    radius_term: torch.Tensor   # float32 [Hkv, 1, C]: radius / sqrt(d)
    avg_size: float             # mean tokens per non-empty cluster


def prepare(cl: Clusters) -> Prepared:
    d = cl.centroids.shape[-1]
    nonempty = cl.sizes > 0
    count = int(nonempty.sum())
    return Prepared(
        empty_bias=torch.where(nonempty, 0.0, -math.inf).unsqueeze(1).contiguous(),
        radius_term=(cl.radius / math.sqrt(d)).unsqueeze(1).contiguous(),
        avg_size=cl.num_tokens * cl.sizes.shape[0] / count if count else 1.0,
    )


def centroid_scores(q: torch.Tensor, cl: Clusters, prep: Prepared) -> torch.Tensor:
    """q.mean_key for every query head and cluster: [Hkv, G, C], -inf for empty clusters.
    (centroids @ q^T streams the centroids once: ~2x faster on CPU than q @ centroids^T.)"""
    hkv, g, _ = q.shape
    out = torch.empty(hkv, g, cl.num_clusters)
    return torch.add(torch.bmm(cl.centroids, q.transpose(1, 2)).transpose(1, 2), prep.empty_bias, out=out)


def rank_scores(q: torch.Tensor, cs: torch.Tensor, prep: Prepared, group: bool, radius_weight: float
                ) -> torch.Tensor:
    """Cluster ranking scores per unit [U, C]: q.mean_key + w * |q| * radius / sqrt(d) (an optimism bonus for
    spread-out clusters, whose best member beats their mean by more), summed over the group if `group`."""
    hkv, g, c = cs.shape
    r = cs
    if radius_weight:
        r = torch.addcmul(cs, q.norm(dim=-1, keepdim=True) * radius_weight, prep.radius_term)
    return r.sum(1) if group else r.reshape(hkv * g, c)


def select_zones(rank: torch.Tensor, r: int, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Retrieval zone: the r best clusters per unit [U, r]. Estimation zone: None when it is every other
    cluster (r + e >= C, no sorting needed), else a mask [U, C] of the next e clusters."""
    u, c = rank.shape
    if r + e >= c:
        return rank.topk(r, dim=1, sorted=False).indices, None
    both = rank.topk(r + e, dim=1, sorted=True).indices
    return both[:, :r], torch.zeros(u, c, dtype=torch.bool).scatter_(1, both[:, r:], True)


def zone_positions(offsets: torch.Tensor, unit_kv: torch.Tensor, clusters: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (in cluster order) of all tokens of the given clusters, per unit, -1 padded.

    offsets [Hkv, C+1]; unit_kv [U] KV head of each unit; clusters [U, r]. Returns (pos [U, T], the cluster
    of each position [U, T]) with T the largest token count over the units.
    """
    u, r = clusters.shape
    starts = offsets[unit_kv.unsqueeze(1), clusters]
    lens = offsets[unit_kv.unsqueeze(1), clusters + 1] - starts
    per_unit = lens.sum(1)
    t = int(per_unit.max()) if u and r else 0
    pos = torch.full((u, t), -1, dtype=torch.int64)
    clus = torch.zeros((u, t), dtype=torch.int64)
    if t == 0:
        return pos, clus
    lens_f = lens.reshape(-1)
    seg = torch.repeat_interleave(torch.arange(u * r), lens_f)
    rank = torch.arange(seg.numel())
    within = rank - (lens_f.cumsum(0) - lens_f)[seg]
    unit = seg // r
    slot = rank - (per_unit.cumsum(0) - per_unit)[unit]
    pos[unit, slot] = starts.reshape(-1)[seg] + within
    clus[unit, slot] = clusters.reshape(-1)[seg]
    return pos, clus


@dataclass
class Candidates:
    """Exactly scored tokens per query head: retrieval zone then pending buffer."""

    scores: torch.Tensor    # float32 [Hq, T+P], -inf on padding
    ids: torch.Tensor       # int64 [Hq, T+P], local ids
    cluster: torch.Tensor   # int64 [Hq, T+P], cluster of a zone token, -1 for pending tokens
    scored: int             # score computations (all query heads together)


def score_candidates(q: torch.Tensor, cl: Clusters, pend_k: torch.Tensor, pos: torch.Tensor,
                     clus: torch.Tensor, group: bool) -> Candidates:
    """Exact q.k of the zone tokens at cluster-order positions pos [U, T] and of all pending keys."""
    hkv, g, d = q.shape
    hq = hkv * g
    units, t = pos.shape
    rep = g if group else 1
    unit_kv = torch.arange(units) // (g // rep)
    valid = pos >= 0
    rows = (unit_kv.unsqueeze(1) * cl.num_tokens + pos.clamp_min(0)).reshape(-1)
    kz = cl.keys.reshape(-1, d).index_select(0, rows).view(units, t, d)
    if kz.dtype != torch.float32:
        kz = kz.float()
    sz = torch.bmm(kz, q.reshape(units, rep, d).transpose(1, 2)).transpose(1, 2)          # [U, rep, T]
    sz = sz.masked_fill(~valid.unsqueeze(1), -math.inf)
    idz = cl.token_ids.reshape(-1).index_select(0, rows).view(units, 1, t).to(torch.int64)
    sz, idz = sz.reshape(hq, t), idz.expand(units, rep, t).reshape(hq, t)
    cz = clus.unsqueeze(1).expand(units, rep, t).reshape(hq, t)
    scored = int(valid.sum()) * rep
    npend = pend_k.shape[1]
    if npend == 0:
        return Candidates(sz, idz, cz, scored)
    sp = torch.bmm(q, pend_k.transpose(1, 2)).reshape(hq, npend)
    idp = (cl.num_tokens + torch.arange(npend)).expand(hq, npend)
    cp = torch.full((hq, npend), -1, dtype=torch.int64)
    return Candidates(torch.cat([sz, sp], 1), torch.cat([idz, idp], 1), torch.cat([cz, cp], 1),
                      scored + hq * npend)


def choose(cand: Candidates, k: int, all_scored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions of the top-k candidates [Hq, k'], ids [Hq, width]): the exact top-k by decreasing score,
    -1 padded to k; with all_scored, followed by every other scored candidate (in zone order, not sorted:
    a full sort costs more than the rest of a search) and -1 padding to the widest row."""
    hq, n = cand.scores.shape
    vals, top = cand.scores.topk(min(k, n), dim=1, sorted=True)
    head = torch.where(vals > -math.inf, torch.gather(cand.ids, 1, top), -1)
    kk = head.shape[1]
    if not all_scored:
        out = torch.full((hq, k), -1, dtype=torch.int64)
        out[:, :kk] = head
        return top, out
    rest = (cand.scores > -math.inf).scatter_(1, top, False)
    width = max(k, kk + (int(rest.sum(1).max()) if n else 0))
    dest = torch.where(rest, rest.cumsum(1) - 1 + kk, width)          # column `width` is a discard slot
    out = torch.full((hq, width + 1), -1, dtype=torch.int64)
    out[:, :kk] = head
    out.scatter_(1, dest, torch.where(rest, cand.ids, -1))
    return top, out[:, :width]


def leftover_scores(cand: Candidates, order: torch.Tensor) -> torch.Tensor:
    """Scores of the candidates not in `order` (the returned ids), -inf elsewhere."""
    return cand.scores.scatter(1, order, -math.inf)


def estimate(cs: torch.Tensor, retrieved: torch.Tensor, mask: torch.Tensor | None, scale: float,
             cl: Clusters, fold: tuple[torch.Tensor, Candidates, torch.Tensor] | None = None) -> Estimate:
    """Partial attention of the estimation zone: cluster i has log-weight log(size_i) + scale * q.mean_key_i
    and value vsum_i / size_i. The zone is every cluster but the retrieved ones [U, r] (mask None) or the
    clusters of mask [U, C].

    fold = (leftover scores [Hq, T+P], their candidates, pending values [Hkv, P, d]): leftover zone tokens
    enter with their exact score, clustered ones with their cluster's mean value, pending ones with their
    own value."""
    hkv, g, c = cs.shape
    d = cl.vs1.shape[-1] - 1
    logits = cs * scale
    m = logits.amax(-1, keepdim=True) if c else torch.zeros(hkv, g, 1)
    fs = None
    if fold is not None and fold[0].shape[1]:
        fs = (fold[0] * scale).view(hkv, g, -1)
        m = torch.maximum(m, fs.amax(-1, keepdim=True))
    m = torch.nan_to_num(m, neginf=0.0)
    w = torch.exp(logits.sub_(m))                                                          # [Hkv, G, C]
    if retrieved.shape[0] == hkv * g:            # per-query-head zones [Hq, r]
        w.view(hkv * g, c).scatter_(1, retrieved, 0.0)
    else:                                        # per-KV-head zones [Hkv, r]
        w.scatter_(2, retrieved.unsqueeze(1).expand(hkv, g, retrieved.shape[1]), 0.0)
    if mask is not None:
        w.mul_(mask.view(hkv, -1, c))
    extra = None
    if fs is not None and fold is not None:
        w, extra = _fold(w, torch.exp(fs - m).reshape(hkv * g, -1), fold[1], fold[2], cl)
    num = torch.bmm(w, cl.vs1)                                                            # [Hkv, G, d+1]
    if extra is not None:
        num += extra
    den = num[..., d]
    ok = den > 0
    out = num[..., :d] / torch.where(ok, den, 1.0).unsqueeze(-1)
    lse = torch.where(ok, m.squeeze(-1) + torch.log(torch.where(ok, den, 1.0)), -math.inf)
    return Estimate(output=out.reshape(hkv * g, d).contiguous(), lse=lse.reshape(hkv * g).contiguous())


def _fold(w: torch.Tensor, ew: torch.Tensor, cand: Candidates, pend_v: torch.Tensor, cl: Clusters
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add leftover weights ew [Hq, T+P]: clustered tokens as weight / size on their cluster (so that
    w @ vs1 adds weight * mean value and weight), pending tokens exactly (returned as extra [Hkv, G, d+1])."""
    hkv, g, c = w.shape
    clustered = cand.cluster >= 0
    add = torch.zeros(hkv * g, c).scatter_add_(1, cand.cluster.clamp_min(0), ew * clustered)
    w = w + add.view(hkv, g, c) / cl.sizes.clamp_min(1.0).unsqueeze(1)
    npend = pend_v.shape[1]
    if npend == 0:
        return w, None
    pw = ew[:, ew.shape[1] - npend:].reshape(hkv, g, npend)
    pv = torch.cat([pend_v, torch.ones(hkv, npend, 1)], -1)
    return w, torch.bmm(pw, pv)
