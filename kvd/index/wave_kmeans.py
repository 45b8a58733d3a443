"""Batched k-means (spherical or Euclidean) for the wave index: many independent segments at once.

Every (KV head, segment) pair is one batch row, so the assignment step is one batched matmul per
iteration and the update one scatter-add; torch spreads both over the intra-op threads. Device-agnostic:
given CUDA tensors it runs on the GPU (the generator stays on the CPU), so a client could cluster during
prefill and ship labels.
"""

from __future__ import annotations

import torch

# Upper bound on the similarity block [rows, m, k] materialized at once (elements).
_SIM_BLOCK = 1 << 25


def _init_centroids(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct random members of each row as the initial centroids: [B, k, d]."""
    b, m, d = x.shape
    pick = torch.rand(b, m, generator=gen).argsort(dim=1)[:, :k].to(x.device)
    return torch.gather(x, 1, pick.unsqueeze(-1).expand(b, k, d))


def _assign(x: torch.Tensor, c: torch.Tensor, dtype: torch.dtype, spherical: bool) -> torch.Tensor:
    """Index of the nearest centroid for every row member: [B, m] int64. Spherical: largest x.c;
    Euclidean: smallest |x - c|^2, i.e. largest [x, 1].[c, -|c|^2 / 2] -- the bias rides in the matmul
    (a baddbmm would first copy the broadcast bias over the whole similarity block: 8-15% slower)."""
    b, m, _ = x.shape
    k = c.shape[1]
    if not spherical:
        x = torch.cat([x, torch.ones(b, m, 1, device=x.device, dtype=x.dtype)], dim=-1)
        c = torch.cat([c, -0.5 * (c * c).sum(-1, keepdim=True)], dim=-1)
    xs, ct = x.to(dtype), c.to(dtype).transpose(1, 2)
    step = max(1, _SIM_BLOCK // max(1, m * k))
    out = torch.empty(b, m, dtype=torch.int64, device=x.device)
    for s in range(0, b, step):
        out[s:s + step] = torch.bmm(xs[s:s + step], ct[s:s + step]).argmax(dim=-1)
    return out


def _update(x: torch.Tensor, assign: torch.Tensor, old: torch.Tensor, spherical: bool) -> torch.Tensor:
    """New centroids from the members (unit length if spherical); an empty cluster keeps its old one."""
    b, _, d = x.shape
    k = old.shape[1]
    flat = (assign + torch.arange(b, device=x.device).unsqueeze(1) * k).reshape(-1)
    sums = torch.zeros(b * k, d, device=x.device, dtype=x.dtype).index_add_(0, flat, x.reshape(-1, d))
    sums = sums.view(b, k, d)
    if spherical:
        norms = sums.norm(dim=-1, keepdim=True)
        return torch.where(norms > 0, sums / norms.clamp_min(1e-12), old)
    counts = torch.bincount(flat, minlength=b * k).view(b, k, 1).to(x.dtype)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), old)


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, spherical: bool,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cluster each row of x [B, m, d] into k clusters: spherical (x must be unit vectors; cosine
    similarity) or Euclidean (Lloyd). `iters` centroid updates after the first assignment.

    Returns the assignment [B, m] int64 in 0..k-1 (the last assignment step, so cluster members and
    the returned labels always agree).
    """
    if k >= x.shape[1]:
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1).clone()
    c = _init_centroids(x, k, gen)
    assign = _assign(x, c, dtype, spherical)
    for _ in range(iters):
        c = _update(x, assign, c, spherical)
        assign = _assign(x, c, dtype, spherical)
    return assign


def segment_labels(x: torch.Tensor, cluster_size: int, segment: int, iters: int, gen: torch.Generator,
                   spherical: bool, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Cluster x [H, n, d] in consecutive segments of `segment` tokens, ~cluster_size tokens per cluster.

    Returns (labels [H, n] int64 with cluster ids unique across segments, number of clusters), the same
    cluster numbering for every head (segment s owns a contiguous id range).
    """
    h, n, d = x.shape
    n_full = n // segment
    labels: list[torch.Tensor] = []
    base = 0
    if n_full:
        k = -(-segment // cluster_size)
        rows = x[:, :n_full * segment].reshape(h * n_full, segment, d)
        lab = kmeans(rows, k, iters, gen, spherical, dtype).view(h, n_full, segment)
        lab = lab + (torch.arange(n_full, device=x.device) * k).view(1, n_full, 1)
        labels.append(lab.reshape(h, n_full * segment))
        base = n_full * k
    tail = n - n_full * segment
    if tail:
        k = -(-tail // cluster_size)
        labels.append(kmeans(x[:, n_full * segment:], k, iters, gen, spherical, dtype) + base)
        base += k
    return torch.cat(labels, dim=1), base


def two_level_labels(x: torch.Tensor, cluster_size: int, segment: int, block: int, iters: int,
                     gen: torch.Generator, spherical: bool, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, int]:
    """Clustering that is (nearly) global over `segment` tokens at the cost of `block`-token segments.

    Level 1: k-means of each segment into ~segment/block coarse clusters. Tokens are then reordered by
    coarse cluster (segments stay in order) and level 2 clusters consecutive blocks of `block` tokens of
    that order into ~cluster_size-token clusters, so fine clusters gather similar tokens from anywhere in
    the segment. Per token and iteration that compares ~segment/block + block/cluster_size centroids
    instead of segment/cluster_size. Returns (labels [H, n], number of clusters) as segment_labels.
    """
    if segment <= block:
        return segment_labels(x, cluster_size, block, iters, gen, spherical, dtype)
    coarse, _ = segment_labels(x, block, segment, iters, gen, spherical, dtype)
    perm = coarse.argsort(dim=1, stable=True)
    xs = torch.gather(x, 1, perm.unsqueeze(-1).expand_as(x))
    fine, c = segment_labels(xs, cluster_size, block, iters, gen, spherical, dtype)
    return torch.empty_like(fine).scatter_(1, perm, fine), c
