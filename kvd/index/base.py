"""The one interface every key index implements.

An index covers the keys of one layer of one session: `num_kv_heads` key sets, each holding the keys of
positions 0..n-1 *local to the index* (the daemon maps local ids to token positions). Searches come per
query head; query head h belongs to KV head h // (num_query_heads // num_kv_heads) (GQA).

Contract:
- build() receives all keys known so far plus optional hints from the GPU side; it may run in a background
  thread, and search() is never called before build() returns.
- add() appends keys of newly offloaded tokens (decode); their local ids continue from the current count.
- search() returns, per query head, up to k local ids ordered by decreasing q.k, padded with -1. An index
  kind with an estimation zone (WAVE) also returns an Estimate: a partial attention (output, log-sum-exp)
  over keys it did not return as ids, which the daemon merges by log-sum-exp into the exact part.
- Serialization round-trips everything search() needs (the disk tier stores it next to the KV).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvd.retro import PastQueries


@dataclass(frozen=True)
class IndexShape:
    num_kv_heads: int
    num_query_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads


@dataclass
class BuildHints:
    """GPU-side help for attention-aware builds, in local key ids.

    queries: float32 [num_query_heads, n_samples, head_dim], a sample of prefill queries.
    topn_ids: int64 [num_query_heads, n_samples, N], exact top-N local key ids of those queries
              (ordered by decreasing score), or None when the index must compute them itself.
    """

    queries: torch.Tensor | None = None
    topn_ids: torch.Tensor | None = None


@dataclass
class Estimate:
    """Partial attention over keys summarized rather than retrieved: output float32 [Hq, head_dim] and
    lse float32 [Hq] (-inf where nothing is estimated). Merged exactly like any other partial attention."""

    output: torch.Tensor
    lse: torch.Tensor


@dataclass
class SearchResult:
    ids: torch.Tensor               # int64 [Hq, k], local ids + id_base, -1 padded
    estimate: Estimate | None = None
    keys_touched: int = 0           # keys scored, averaged over query heads (fraction touched = this / count)
    # float32 q.k of every valid id, when the index scored them from a copy of the keys in `scores_from`
    # precision (the caller may then skip rescoring them from the session when that copy is exact)
    scores: torch.Tensor | None = None
    scores_from: torch.dtype | None = None
    ranked: bool = False            # ids are ordered by decreasing score, invalid ones (-1, -inf) last
    id_base: int = 0                # added to every valid id already (a kind may return session positions)


@dataclass
class Attended:
    """A search and the attention over what it found, in one pass (KeyIndex.search_attend): ids int64 [Hq, k]
    (session positions, by decreasing score, -1 padded), output float32 [Hq, head_dim], lse float32 [Hq] (-inf
    for a head without keys), count: the valid ids of query head 0."""

    ids: torch.Tensor
    output: torch.Tensor
    lse: torch.Tensor
    count: int
    past_output: torch.Tensor | None = None  # with past queries (kvd.retro): float32 [P, Hq, head_dim]
    past_lse: torch.Tensor | None = None     # float32 [P, Hq]
    packed: torch.Tensor | None = None       # with past queries: the block all of them are views of (AttendSlots)


@dataclass(frozen=True)
class AttendSlots:
    """Where one sequence's attention result is written in place (e.g. views of the reply's shared memory):
    ids int64 [Hq, k], output float32 [Hq, head_dim], lse float32 [Hq]. With past queries (kvd.retro), packed
    float32 [P + 1, Hq, head_dim + 1]: the sequence's block of a packed reply (RetrieveResponse.packed), which
    output and lse are views of (`packed_slots`)."""

    ids: torch.Tensor
    output: torch.Tensor
    lse: torch.Tensor
    packed: torch.Tensor | None = None
    past_output: torch.Tensor | None = None  # with packed: its views [P, Hq, head_dim] and [P, Hq]
    past_lse: torch.Tensor | None = None


def packed_slots(ids: torch.Tensor, packed: torch.Tensor) -> AttendSlots:
    """The slots of a sequence with past queries: the past queries' outputs and lse are the first P rows of its
    packed block [P + 1, Hq, d + 1] (the log-sum-exp in the last column), the current query's the last row.
    The views are made once (torch indexing costs microseconds per call)."""
    dim = packed.shape[-1] - 1
    return AttendSlots(ids=ids, output=packed[-1, :, :dim], lse=packed[-1, :, dim], packed=packed,
                       past_output=packed[:-1, :, :dim], past_lse=packed[:-1, :, dim])


@dataclass(frozen=True)
class StoredKeys:
    """The session's own keys of the layer, for kinds that read them instead of keeping a copy: keys
    [num_kv_heads, length, head_dim] in the session's dtype (a view of the layer's store), local id i at row
    base + i. Passed with every build, add and search (the store may be reallocated in between)."""

    keys: torch.Tensor
    base: int


class KeyIndex(ABC):
    kind: str = "abstract"
    # build() accepts keys in the session's dtype (not only float32) and converts what it needs itself
    takes_session_dtype: bool = False

    def __init__(self, shape: IndexShape, params: dict[str, str] | None = None) -> None:
        self.shape = shape
        self.params = dict(params or {})

    @abstractmethod
    def build(self, keys: torch.Tensor, values: torch.Tensor | None, hints: BuildHints | None,
              stored: StoredKeys | None = None) -> None:
        """keys/values: float32 [num_kv_heads, n, head_dim] (keys in the session's dtype for kinds that
        takes_session_dtype). values are needed only by kinds that estimate. stored: see StoredKeys."""

    @abstractmethod
    def add(self, keys: torch.Tensor, values: torch.Tensor | None, stored: StoredKeys | None = None) -> None:
        """Append keys (float32 [num_kv_heads, n_new, head_dim]) with the next local ids."""

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str] | None = None,
               stored: StoredKeys | None = None) -> SearchResult:
        """queries: float32 [num_query_heads, head_dim]."""

    def search_attend(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str],
                      stored: StoredKeys, values: torch.Tensor, tails: list[tuple[int, int]],
                      into: AttendSlots | None = None, past: PastQueries | None = None) -> Attended | None:
        """search() plus an exact scan of the session positions in `tails` (keys the index does not cover) and
        the softmax(scale * q.k) attention over the top k of both, for kinds that can do it in one compiled
        pass; values: the session's [num_kv_heads, length, head_dim]; into: where to write the result (the
        Attended then holds these tensors); past: one sequence's RetroAttention past queries, attended over
        their newly seen keys in the same pass (kvd.retro). None: not for this call (the caller then searches,
        scans and attends step by step, with the same result)."""
        return None

    def check_search_params(self, params: dict[str, str]) -> None:
        """Raise ValueError for per-call search params this index cannot use (checked before a search, so that
        a caller's mistake is reported as such and not as a failed search). Kinds without checks accept all."""
        return

    @property
    @abstractmethod
    def count(self) -> int:
        """Number of keys indexed per KV head."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the index holds beyond the keys themselves."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        ...

    @classmethod
    @abstractmethod
    def from_bytes(cls, shape: IndexShape, params: dict[str, str], data: bytes) -> KeyIndex:
        ...
