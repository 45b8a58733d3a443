"""RetroAttention on the daemon side: earlier decode queries attend the keys that a Retrieve newly retrieved.

A Retrieve may carry P past queries per sequence (RetrieveRequest.past). After the current query's search,
past query p of sequence i attends, per query head h, the positions retrieved for (i, h) that it has not seen
yet: below its `seen_from` bound (it attended everything from there on through its device window) and not in
its `seen_ids`. The reply carries that partial attention (float32 output + log-sum-exp, -inf when nothing is
new); the client merges it into p's cached output by log-sum-exp, so the cached output stays equal to attention
over the union of every key set p has been shown. Only the retrieved keys count: the wave index's estimation
zone is not included.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit

from kvd import gather_kernels
from kvd.errors import InvalidArgument
from kvd.retrieval import Mode, SequenceResult, SessionSpilled
from kvd.store.session import Session, Tier
from kvd.validate import QUERY_DTYPES, check_dtype, check_finite, check_shape

if TYPE_CHECKING:
    from kvd.convert import TensorCodec
    from kvd.shm import OutputWriter
    from kvd.v1 import kvd_pb2 as pb

MAX_PAST = 64            # past queries per sequence
MAX_SEEN = 1 << 16       # seen ids per past query and head
ID_DTYPES = (torch.int32, torch.int64)


@dataclass
class PastQueries:
    queries: torch.Tensor             # float32 [n, P, Hq, d] once checked
    seen_ids: torch.Tensor | None     # int64 [n, P, Hq, S]
    seen_from: torch.Tensor | None    # int64 [n, P]


def past_from_wire(codec: TensorCodec, message: pb.PastQueries) -> PastQueries:
    """The tensors of RetrieveRequest.past, as sent (checked later by `check_past`)."""
    queries = codec.read(message.queries, "past.queries")
    assert queries is not None
    return PastQueries(queries, codec.read(message.seen_ids, "past.seen_ids", required=False),
                       codec.read(message.seen_from, "past.seen_from", required=False))


def check_past(past: PastQueries, sequences: int, heads: int, head_dim: int, mode: Mode) -> PastQueries:
    """Validate shapes, dtypes and values; returns float32 queries and int64 ids."""
    if mode is not Mode.ATTENTION:
        raise InvalidArgument(f"past queries need mode ATTENTION, not {mode.name}")
    queries = past.queries
    check_dtype("past.queries", queries, QUERY_DTYPES)
    if queries.dim() != 4 or queries.shape[0] != sequences or not 1 <= queries.shape[1] <= MAX_PAST:
        raise InvalidArgument(f"past.queries has shape {list(queries.shape)}, expected [{sequences}, P, {heads}, "
                              f"{head_dim}] with 1 <= P <= {MAX_PAST}")
    count = queries.shape[1]
    check_shape("past.queries", queries, (sequences, count, heads, head_dim))
    check_finite("past.queries", queries)
    seen_ids = past.seen_ids
    if seen_ids is not None:
        check_dtype("past.seen_ids", seen_ids, ID_DTYPES)
        if seen_ids.dim() != 4 or tuple(seen_ids.shape[:3]) != (sequences, count, heads) \
                or seen_ids.shape[3] > MAX_SEEN:
            raise InvalidArgument(f"past.seen_ids has shape {list(seen_ids.shape)}, expected [{sequences}, {count}, "
                                  f"{heads}, S] with S <= {MAX_SEEN}")
        seen_ids = seen_ids.to(torch.int64)
    seen_from = past.seen_from
    if seen_from is not None:
        check_dtype("past.seen_from", seen_from, ID_DTYPES)
        check_shape("past.seen_from", seen_from, (sequences, count))
        seen_from = seen_from.to(torch.int64)
    return PastQueries(queries.float(), seen_ids, seen_from)


def newly_seen(ids: torch.Tensor, count: int, seen_ids: torch.Tensor | None, seen_from: torch.Tensor | None
               ) -> torch.Tensor:
    """ids [Hq, m] (-1 = none) -> bool [P, Hq, m]: which of them past query p has not attended yet."""
    heads, m = ids.shape
    seen = torch.empty(count, heads, 0, dtype=torch.int64) if seen_ids is None else seen_ids
    bound = torch.full((count,), _NO_BOUND, dtype=torch.int64) if seen_from is None else seen_from
    out = np.empty((count, heads, m), np.bool_)
    _unseen(np.ascontiguousarray(ids.to(torch.int64).numpy()), np.ascontiguousarray(seen.numpy()),
            np.ascontiguousarray(bound.numpy()), out)
    return torch.from_numpy(out)


_NO_BOUND = (1 << 62)


@njit(cache=True, nogil=True)
def _unseen(ids: np.ndarray, seen: np.ndarray, bound: np.ndarray, out: np.ndarray) -> None:
    """out[p, h, j] = 0 <= ids[h, j] < bound[p] and ids[h, j] not in seen[p, h, :]: an open-addressing hash set
    per (p, h) (a sort of the seen ids costs several times more in torch)."""
    count, heads, width = seen.shape
    m = ids.shape[1]
    size = 16
    while size < 2 * width + 1:
        size *= 2
    mask = size - 1
    table = np.empty(size, np.int64)
    for p in range(count):
        for h in range(heads):
            table[:] = -1
            for j in range(width):
                x = seen[p, h, j]
                if x < 0:
                    continue
                i = (x * 2654435761) & mask
                while table[i] != -1 and table[i] != x:
                    i = (i + 1) & mask
                table[i] = x
            for j in range(m):
                x = ids[h, j]
                new = 0 <= x < bound[p]
                if new:
                    i = (x * 2654435761) & mask
                    while table[i] != -1:
                        if table[i] == x:
                            new = False
                            break
                        i = (i + 1) & mask
                out[p, h, j] = new


def warmup() -> None:
    """Compile (or load from the numba cache) the newly-seen kernel: ~1 s on the first past query otherwise."""
    newly_seen(torch.tensor([[0, 1]]), 1, torch.tensor([[[0]]]), torch.tensor([2]))


def attend_past(keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, queries: torch.Tensor,
                seen_ids: torch.Tensor | None, seen_from: torch.Tensor | None, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of P past queries over their newly seen keys, in float32.

    keys, values [Hkv, L, d]; ids [Hq, m] (this call's retrieval, -1 padded); queries float32 [P, Hq, d];
    seen_ids [P, Hq, S]; seen_from [P]. Returns output [P, Hq, d] (zeros where nothing is new) and lse [P, Hq]
    (-inf there)."""
    count, heads, dim = queries.shape
    new = newly_seen(ids, count, seen_ids, seen_from)
    out = torch.zeros(count, heads, dim)
    lse = torch.full((count, heads), float("-inf"))
    if not bool(new.any()):
        return out, lse
    if gather_kernels.supported(keys) and gather_kernels.supported(values):  # bf16/fp32 stores: compiled rows
        chosen = torch.where(new, ids.unsqueeze(0), -1)
        for p in range(count):
            scores = gather_kernels.score_rows(keys, queries[p], chosen[p])
            out[p], lse[p] = gather_kernels.attend_rows(values, chosen[p], scores, scale)
        return out, lse
    kv_head = (torch.arange(heads) // (heads // keys.shape[0])).unsqueeze(1)
    rows = ids.clamp(min=0)
    scores = torch.einsum("phd,hmd->phm", queries, keys[kv_head, rows].float()) * scale
    scores = scores.masked_fill_(~new, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    probs = torch.where(new, probs, torch.zeros_like(probs))
    out = torch.einsum("phm,hmd->phd", probs, values[kv_head, rows].float())
    return out, lse


def attend_past_batch(sessions: Sequence[Session], results: list[SequenceResult], past: PastQueries, layer: int,
                      scale: float, pool: Executor | None) -> None:
    """Fill each result's past_output/past_lse (raises SessionSpilled like retrieve_sequence)."""
    def one(i: int) -> None:
        session = sessions[i]
        with session.lock.read():
            if session.tier is not Tier.MEMORY:
                raise SessionSpilled(session.session_id)
            keys, values = session.layers[layer].view()
            seen_ids = None if past.seen_ids is None else past.seen_ids[i]
            seen_from = None if past.seen_from is None else past.seen_from[i]
            results[i].past_output, results[i].past_lse = attend_past(
                keys, values, results[i].ids, past.queries[i], seen_ids, seen_from, scale)

    if pool is None or len(sessions) == 1:
        for i in range(len(sessions)):
            one(i)
    else:
        list(pool.map(one, range(len(sessions))))


def write_past(codec: TensorCodec, writer: OutputWriter | None, results: list[SequenceResult],
               reply: pb.RetrieveResponse) -> None:
    codec.write(writer, torch.stack([r.past_output for r in results]), reply.past_output)  # type: ignore[misc]
    codec.write(writer, torch.stack([r.past_lse for r in results]), reply.past_lse)  # type: ignore[misc]
