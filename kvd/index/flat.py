"""Exact top-k by scanning every key: the correctness oracle for every other index kind."""

from __future__ import annotations

from concurrent.futures import Executor

import torch

from kvd import gather_kernels, scan_kernels
from kvd.index.base import BuildHints, IndexShape, KeyIndex, SearchResult, StoredKeys

# Keys are converted to float32 chunk by chunk so that a scan never holds a float32 copy of the whole layer.
_SCAN_CHUNK_TOKENS = 16384
# The fast scan works on chunks of at least this many tokens, in parallel.
_MIN_TASK_TOKENS = 4096
# Coarse scores are computed in the keys' 16-bit dtype (bf16 matrix products are ~7x faster on CPUs than
# converting to float32 first; fp16 products have no fast CPU kernel, so fp16 keys go through bf16).
_COARSE_DTYPE = {torch.bfloat16: torch.bfloat16, torch.float16: torch.bfloat16, torch.float32: torch.float32}
# Relative rounding of a coarse score when the product's output is stored (8-bit significand for bf16).
_OUTPUT_EPS = {torch.bfloat16: 2.0**-8, torch.float32: 2.0**-22}


def exact_scores(queries: torch.Tensor, keys: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Scores q.k in float32 for keys [begin, end): queries [Hq, d], keys [Hkv, n, d] -> [Hq, end - begin]."""
    num_kv_heads, _, head_dim = keys.shape
    group = queries.shape[0] // num_kv_heads
    grouped = queries.float().reshape(num_kv_heads, group, head_dim)
    scores = torch.empty((num_kv_heads, group, end - begin), dtype=torch.float32)
    for start in range(begin, end, _SCAN_CHUNK_TOKENS):
        stop = min(end, start + _SCAN_CHUNK_TOKENS)
        chunk = keys[:, start:stop].float()
        torch.bmm(grouped, chunk.transpose(1, 2), out=scores[:, :, start - begin: stop - begin])
    return scores.reshape(queries.shape[0], end - begin)


def scores_at(queries: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exact float32 scores of the keys at positions ids [Hq, m] (all valid)."""
    if gather_kernels.supported(keys):
        return gather_kernels.score_rows(keys, queries, ids)
    group = queries.shape[0] // keys.shape[0]
    heads = (torch.arange(queries.shape[0]) // group).unsqueeze(1)
    gathered = keys[heads, ids].float()
    return torch.bmm(gathered, queries.float().unsqueeze(-1)).squeeze(-1)


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, begin: int = 0, end: int | None = None,
               pool: Executor | None = None, key_norms: torch.Tensor | None = None, threads: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k positions (absolute, ordered by decreasing exact float32 score) and their scores in [begin, end).

    bf16 and float32 stores: one compiled pass (kvd.scan_kernels) on the search threads. Other stores (fp16):
    coarse scores in 16-bit pick candidates chunk by chunk (in parallel on `pool`), candidates are rescored in
    float32, and a bound on the coarse error proves that no key outside the candidates can be in the top-k; a
    head for which the proof fails is rescanned in float32.
    key_norms: max |k| per KV head over the scanned keys (computed here when not given). threads: the compiled
    pass's parallel region size (0 = one per core)."""
    end = keys.shape[1] if end is None else end
    n = max(0, end - begin)
    count = min(k, n)
    if count == 0:
        empty = torch.empty((queries.shape[0], 0))
        return empty.long(), empty
    if gather_kernels.supported(keys):
        return scan_kernels.scan_topk(queries, keys, count, begin, end, threads)
    num_kv_heads, _, head_dim = keys.shape
    num_query_heads = queries.shape[0]
    group = num_query_heads // num_kv_heads
    coarse_dtype = _COARSE_DTYPE.get(keys.dtype, torch.float32)
    margin = min(n, max(2 * count, count + 64))
    grouped = queries.float().reshape(num_kv_heads, group, head_dim).to(coarse_dtype)

    def chunk_candidates(bounds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = bounds
        # One matrix product per KV head: keys[h, lo:hi] is contiguous, so its transpose feeds the BLAS kernel
        # directly; a batched product over the strided [:, lo:hi] view copies it first (~8x slower).
        scores = torch.empty((num_kv_heads, group, hi - lo), dtype=coarse_dtype)
        for head in range(num_kv_heads):
            chunk = keys[head, lo:hi]
            if chunk.dtype != coarse_dtype:
                chunk = chunk.to(coarse_dtype)
            torch.mm(grouped[head], chunk.T, out=scores[head])
        scores = scores.reshape(num_query_heads, hi - lo).float()
        values, ids = torch.topk(scores, min(margin, hi - lo), dim=1, sorted=False)
        return values, ids + lo

    tasks = _split(begin, end, pool)
    parts = list(pool.map(chunk_candidates, tasks)) if pool is not None and len(tasks) > 1 \
        else [chunk_candidates(t) for t in tasks]
    coarse = torch.cat([p[0] for p in parts], dim=1)
    candidates = torch.cat([p[1] for p in parts], dim=1)
    coarse_top, order = torch.topk(coarse, margin, dim=1)
    candidates = torch.gather(candidates, 1, order)
    exact = scores_at(queries, keys, candidates)
    top_scores, top_order = torch.topk(exact, count, dim=1)
    top_ids = torch.gather(candidates, 1, top_order)
    if margin < n:
        if key_norms is None:
            key_norms = keys[:, begin:end].float().norm(dim=-1).amax(dim=1)
        norms = key_norms.repeat_interleave(group)
        # |true - coarse| <= eps*|coarse| + e, with e covering the rounding of q (known exactly) and of fp16
        # keys to bf16; no key below the margin can then beat the k-th candidate (see the docstring).
        rounded_q = grouped.float().reshape(num_query_heads, head_dim)
        e = (queries.float() - rounded_q).norm(dim=-1) * norms
        if keys.dtype != coarse_dtype:
            e = e + 2.0**-8 * queries.float().norm(dim=-1) * norms
        eps = _OUTPUT_EPS[coarse_dtype]
        kth, last = coarse_top[:, count - 1], coarse_top[:, margin - 1]
        unproven = last + eps * last.abs() + e >= kth - eps * kth.abs() - e
        for head in unproven.nonzero().flatten().tolist():
            kv_head = head // group
            scores = exact_scores(queries[head: head + 1], keys[kv_head: kv_head + 1], begin, end)
            values, ids = torch.topk(scores, count, dim=1)
            top_scores[head], top_ids[head] = values[0], ids[0] + begin
    return top_ids, top_scores


def _split(begin: int, end: int, pool: Executor | None) -> list[tuple[int, int]]:
    workers = getattr(pool, "_max_workers", 1) if pool is not None else 1
    step = max(_MIN_TASK_TOKENS, -(-(end - begin) // max(1, 2 * workers)))
    return [(lo, min(end, lo + step)) for lo in range(begin, end, step)]


def pad_ids(ids: torch.Tensor, k: int) -> torch.Tensor:
    if ids.shape[-1] >= k:
        return ids
    pad = torch.full((*ids.shape[:-1], k - ids.shape[-1]), -1, dtype=torch.int64)
    return torch.cat([ids, pad], dim=-1)


class FlatIndex(KeyIndex):
    kind = "flat"

    def __init__(self, shape: IndexShape, params: dict[str, str] | None = None) -> None:
        super().__init__(shape, params)
        self._keys = torch.empty((shape.num_kv_heads, 0, shape.head_dim))

    def build(self, keys: torch.Tensor, values: torch.Tensor | None, hints: BuildHints | None,
              stored: StoredKeys | None = None) -> None:
        self._keys = keys.float().contiguous()

    def add(self, keys: torch.Tensor, values: torch.Tensor | None, stored: StoredKeys | None = None) -> None:
        self._keys = torch.cat([self._keys, keys.float()], dim=1)

    def search(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str] | None = None,
               stored: StoredKeys | None = None) -> SearchResult:
        ids, _ = exact_topk(queries, self._keys, k)
        return SearchResult(ids=pad_ids(ids, k), keys_touched=self.count)

    @property
    def count(self) -> int:
        return self._keys.shape[1]

    def nbytes(self) -> int:
        return 0

    def to_bytes(self) -> bytes:
        return b""

    @classmethod
    def from_bytes(cls, shape: IndexShape, params: dict[str, str], data: bytes) -> FlatIndex:
        raise NotImplementedError("a flat index holds no state of its own: rebuild it from the keys")
