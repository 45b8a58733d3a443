"""Exact top-k by scanning every key: the correctness oracle for every other index kind."""

from __future__ import annotations

import torch

from kvd.index.base import BuildHints, IndexShape, KeyIndex, SearchResult

# Keys are converted to float32 chunk by chunk so that a scan never holds a float32 copy of the whole layer.
_SCAN_CHUNK_TOKENS = 16384


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


def exact_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, begin: int = 0, end: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k positions (absolute, ordered by decreasing score) and their scores among keys [begin, end)."""
    end = keys.shape[1] if end is None else end
    count = min(k, max(0, end - begin))
    if count == 0:
        empty = torch.empty((queries.shape[0], 0))
        return empty.long(), empty
    scores = exact_scores(queries, keys, begin, end)
    top_scores, top_ids = torch.topk(scores, count, dim=-1, sorted=True)
    return top_ids + begin, top_scores


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

    def build(self, keys: torch.Tensor, values: torch.Tensor | None, hints: BuildHints | None) -> None:
        self._keys = keys.float().contiguous()

    def add(self, keys: torch.Tensor, values: torch.Tensor | None) -> None:
        self._keys = torch.cat([self._keys, keys.float()], dim=1)

    def search(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str] | None = None
               ) -> SearchResult:
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
