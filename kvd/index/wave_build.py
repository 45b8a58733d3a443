"""Building the wave index's clusters: the clustering space (metric) and the per-cluster summaries.

Metrics (the space k-means runs in; cluster summaries are always taken in key space):
- "query": Euclidean k-means on (k - mean) @ P with P = V_r sqrt(L_r), the top-r eigenpairs of the prefill
  queries' second moment E[q q^T] (per KV head, over its group's query heads). |(k1 - k2) @ P|^2 is
  then the expected squared score difference E_q[(q.k1 - q.k2)^2] restricted to the r directions that carry
  most of the queries' energy: members of a cluster score alike for typical queries, so a cluster's mean
  key predicts its members' scores. Needs BuildHints.queries; without them "euclid" is used.
- "euclid": Euclidean k-means on k - mean (norm-aware: long keys, which dominate the top-k, are grouped
  with long keys).
- "spherical": RetroInfer's spherical k-means on the unit directions of k - mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvd.index.wave_kmeans import segment_labels, two_level_labels

METRICS = ("query", "euclid", "spherical")


@dataclass
class Space:
    """How keys are mapped into the clustering space: x = (k - mean) @ proj (proj None: identity),
    normalized when spherical."""

    metric: str
    mean: torch.Tensor                 # float32 [H, d]
    proj: torch.Tensor | None = None   # float32 [H, d, r] for the query metric

    def map(self, keys: torch.Tensor) -> torch.Tensor:
        x = keys - self.mean.unsqueeze(1)
        if self.proj is not None:
            x = torch.bmm(x, self.proj)
        if self.metric == "spherical":
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x.contiguous()


def query_projection(queries: torch.Tensor, num_kv_heads: int, rank: int) -> torch.Tensor:
    """P [Hkv, d, r]: top-r eigenvectors of each group's query second moment, scaled by sqrt(eigenvalue).
    queries: float32 [Hq, m, d]."""
    hq, m, d = queries.shape
    q = queries.float().reshape(num_kv_heads, (hq // num_kv_heads) * m, d)
    second = torch.bmm(q.transpose(1, 2), q).double() / max(1, q.shape[1])
    evals, evecs = torch.linalg.eigh(second)                    # ascending
    r = min(rank, d)
    top_vals = evals[:, -r:].clamp_min(0.0).flip(-1)
    top_vecs = evecs[:, :, -r:].flip(-1)
    return (top_vecs * top_vals.sqrt().unsqueeze(1)).float().contiguous()


def make_space(metric: str, keys: torch.Tensor, queries: torch.Tensor | None, rank: int) -> Space:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    h, n, d = keys.shape
    mean = keys.mean(1) if n else torch.zeros(h, d)
    if metric == "query":
        if queries is None or queries.shape[1] == 0:
            return Space("euclid", mean)
        return Space("query", mean, query_projection(queries, h, rank))
    return Space(metric, mean)


@dataclass
class Clusters:
    """Clusters over the tokens of all KV heads: C clusters per head (same count on every head; a cluster
    may be empty), n tokens per head in cluster order (CSR)."""

    centroids: torch.Tensor   # float32 [H, C, d]: mean key of each cluster (un-centred, key space)
    vs1: torch.Tensor         # float32 [H, C, d+1]: value sum, then the size in the last column
    radius: torch.Tensor      # float32 [H, C]: RMS distance of the members to the mean key (key space)
    offsets: torch.Tensor     # int64 [H, C+1]: start of each cluster in keys/token_ids
    token_ids: torch.Tensor   # int32 [H, n]: local ids in cluster order
    keys: torch.Tensor        # [H, n, d]: keys in cluster order (float32, or 16-bit: WaveParams.key_dtype)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def sizes(self) -> torch.Tensor:
        return self.vs1[..., -1]


def empty_clusters(h: int, d: int, key_dtype: torch.dtype = torch.float32) -> Clusters:
    return Clusters(torch.zeros(h, 0, d), torch.zeros(h, 0, d + 1), torch.zeros(h, 0),
                    torch.zeros(h, 1, dtype=torch.int64), torch.zeros(h, 0, dtype=torch.int32),
                    torch.zeros(h, 0, d, dtype=key_dtype))


def summarize(keys: torch.Tensor, values: torch.Tensor, labels: torch.Tensor, c: int, first_id: int,
              key_dtype: torch.dtype = torch.float32) -> Clusters:
    """Per-cluster summaries and the cluster-ordered layout of tokens given labels [H, n] in 0..c-1.
    Row-wise index_add_/index_select on flattened [H*n, d] views: several times faster on CPU than
    scatter_add_/gather with an index expanded over d."""
    h, n, d = keys.shape
    flat = (labels + torch.arange(h).unsqueeze(1) * c).reshape(-1)
    sizes = torch.bincount(flat, minlength=h * c).view(h, c).to(torch.float32)
    ksum = torch.zeros(h * c, d).index_add_(0, flat, keys.reshape(-1, d)).view(h, c, d)
    vsum = torch.zeros(h * c, d).index_add_(0, flat, values.reshape(-1, d)).view(h, c, d)
    sq = torch.zeros(h * c).index_add_(0, flat, keys.pow(2).sum(-1).reshape(-1)).view(h, c)
    per = sizes.clamp_min(1.0)
    centroids = ksum / per.unsqueeze(-1)
    radius = (sq / per - centroids.pow(2).sum(-1)).clamp_min(0.0).sqrt()   # RMS distance to the mean
    order = labels.argsort(dim=1, stable=True)
    rows = (order + torch.arange(h).unsqueeze(1) * n).reshape(-1)
    offsets = torch.cat([torch.zeros(h, 1, dtype=torch.int64), sizes.to(torch.int64).cumsum(1)], dim=1)
    return Clusters(
        centroids=centroids,
        vs1=torch.cat([vsum, sizes.unsqueeze(-1)], dim=-1),
        radius=radius,
        offsets=offsets,
        token_ids=(order + first_id).to(torch.int32),
        keys=keys.reshape(-1, d).index_select(0, rows).view(h, n, d).to(key_dtype),
    )


def cluster_block(keys: torch.Tensor, values: torch.Tensor, space: Space, first_id: int, cluster_size: int,
                  segment: int, block: int, iters: int, gen: torch.Generator, dtype: torch.dtype,
                  key_dtype: torch.dtype = torch.float32) -> Clusters:
    """Cluster keys/values [H, n, d] (local ids first_id..first_id+n-1) segment by segment; block > 0:
    two-level clustering of each segment (wave_kmeans.two_level_labels)."""
    x = space.map(keys)
    spherical = space.metric == "spherical"
    if 0 < block < segment:
        labels, c = two_level_labels(x, cluster_size, segment, block, iters, gen, spherical, dtype)
    else:
        labels, c = segment_labels(x, cluster_size, segment, iters, gen, spherical, dtype)
    return summarize(keys, values, labels, c, first_id, key_dtype)


def concat(a: Clusters, b: Clusters) -> Clusters:
    """a's clusters then b's (b's token positions shifted behind a's)."""
    if a.num_tokens == 0 and a.num_clusters == 0:
        return b
    return Clusters(
        centroids=torch.cat([a.centroids, b.centroids], 1),
        vs1=torch.cat([a.vs1, b.vs1], 1),
        radius=torch.cat([a.radius, b.radius], 1),
        offsets=torch.cat([a.offsets, b.offsets[:, 1:] + a.num_tokens], 1),
        token_ids=torch.cat([a.token_ids, b.token_ids], 1),
        keys=torch.cat([a.keys, b.keys], 1),
    )
