"""Batched retrieval: top-k per query head over each session's keys, gathered K/V, partial attention."""

from __future__ import annotations

import math
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import Enum

import torch
from kvd_client.attention import attention_from_scores, merge_attention

from kvd import gather_kernels, parallel, retro, scan_kernels
from kvd.errors import FailedPrecondition, InvalidArgument
from kvd.index.base import AttendSlots
from kvd.index.flat import exact_topk, pad_ids, scores_at
from kvd.store.session import Session, Tier


class SessionSpilled(Exception):
    """The session moved to disk between its promotion and this read; the caller promotes and retries."""


class Mode(Enum):
    IDS = "ids"
    IDS_KV = "ids_kv"
    ATTENTION = "attention"


@dataclass
class SequenceResult:
    ids: torch.Tensor                  # int64 [Hq, k], absolute positions, -1 padded
    count: int
    index_kind: str
    keys: torch.Tensor | None = None   # [Hq, k, d] session dtype
    values: torch.Tensor | None = None
    output: torch.Tensor | None = None  # float32 [Hq, d]
    lse: torch.Tensor | None = None     # float32 [Hq]
    past_output: torch.Tensor | None = None  # with past queries (kvd.retro): float32 [P, Hq, d]
    past_lse: torch.Tensor | None = None     # float32 [P, Hq]
    packed: torch.Tensor | None = None  # with past queries: the block [P + 1, Hq, d + 1] that all four are views of
    search_s: float = 0.0   # time spent finding the keys (index search, exact scan or candidate scoring)
    attend_s: float = 0.0   # time spent attending them (mode ATTENTION)
    search_kernel_s: float = 0.0  # of search_s / attend_s: inside compiled parallel regions (kvd.parallel.timed)
    attend_kernel_s: float = 0.0
    in_place: bool = False  # ids, output and lse (and packed) are the RetrieveSpec.into slots, written there already


@dataclass
class RetrieveSpec:
    layer: int
    k: int
    mode: Mode
    scale: float
    exact: bool
    params: dict[str, str]
    pool: Executor | None = None     # parallel chunks of exact scans
    threads: int = 0                 # params["threads"]: the exact scan's, candidate scoring's and attention's
    #                                  parallel regions (0 = one thread per core); the graph reads it from params
    into: list[AttendSlots] | None = None  # mode ATTENTION: per sequence, where a result may be written in place


def resolve_range(session: Session, length: int, requested: tuple[int, int] | None) -> tuple[int, int]:
    if requested is None:
        return session.offloaded_range(length)
    begin, end = requested
    end = length if end == 0 else end
    if begin > end or end > length:
        raise InvalidArgument(
            f"session {session.session_id!r}: range [{begin}, {end}) is outside the {length} stored tokens"
        )
    return begin, end


def _gather(store: torch.Tensor, ids: torch.Tensor, group: int) -> torch.Tensor:
    """store [Hkv, n, d], ids [Hq, k] (may hold -1) -> [Hq, k, d] (rows of -1 ids are zero)."""
    num_query_heads = ids.shape[0]
    head_of_query = torch.arange(num_query_heads) // group
    gathered = store[head_of_query.unsqueeze(1), ids.clamp(min=0)]
    if (ids < 0).any():
        gathered[ids < 0] = 0
    return gathered


def retrieve_sequence(session: Session, queries: torch.Tensor, spec: RetrieveSpec,
                      requested_range: tuple[int, int] | None, past: retro.PastQueries | None = None,
                      candidates: torch.Tensor | None = None, into: AttendSlots | None = None) -> SequenceResult:
    """queries: float32 [Hq, d]; past: this sequence's past queries (mode ATTENTION; kvd.retro), attended in
    the same pass over the retrieved rows; candidates: int64 [Hq, C] positions to choose from instead of a
    search; into: where a fused search may write the result (SequenceResult.in_place says whether it did).
    Runs under the session's read lock."""
    shape = session.shape
    with session.lock.read():
        if session.tier is not Tier.MEMORY:
            raise SessionSpilled(session.session_id)
        layer = session.layers[spec.layer]
        keys, values = layer.view()
        length = keys.shape[1]
        if length == 0:
            raise FailedPrecondition(f"session {session.session_id!r}: layer {spec.layer} has no tokens appended")
        begin, end = resolve_range(session, length, requested_range)
        started = time.perf_counter()
        parallel.take_seconds()
        if spec.mode is Mode.ATTENTION and candidates is None and not spec.exact \
                and (slot := session.indexes[spec.layer]) is not None:
            fused = slot.search_attend(queries, keys, values, spec.k, spec.scale, begin, end, spec.params, into,
                                       past)
            if fused is not None:  # search, tail scan and attention in one compiled pass (attend_s is inside)
                return SequenceResult(ids=fused.ids, count=fused.count, index_kind=slot.kind, output=fused.output,
                                      lse=fused.lse, past_output=fused.past_output, past_lse=fused.past_lse,
                                      packed=fused.packed,
                                      search_s=time.perf_counter() - started, search_kernel_s=parallel.take_seconds(),
                                      in_place=into is not None)
        if candidates is not None:
            ids, scores = candidate_topk(queries, keys, candidates, spec.k, begin, end, spec.threads)
            estimate, kind = None, "candidates"
        else:
            ids, scores, estimate, kind = _search(session, queries, keys, spec, begin, end)
        searched = time.perf_counter()
        count = int((ids[0] >= 0).sum()) if ids.numel() else 0
        result = SequenceResult(ids=pad_ids(ids, spec.k), count=count, index_kind=kind, search_s=searched - started,
                                search_kernel_s=parallel.take_seconds())
        if spec.mode is Mode.IDS:
            return result
        if spec.mode is Mode.IDS_KV:
            result.keys = _pad_rows(_gather(keys, ids, shape.group_size), spec.k)
            result.values = _pad_rows(_gather(values, ids, shape.group_size), spec.k)
            return result
        # The search already scored the chosen keys exactly in float32: no second gather of K.
        if past is not None and retro.fused(keys, values):
            output, lse, result.past_output, result.past_lse = retro.attend_rows_past(
                keys, values, ids, scores, spec.scale, past, spec.threads or None)
        elif gather_kernels.supported(values):
            output, lse = gather_kernels.attend_rows(values, ids, scores, spec.scale, spec.threads)
        else:
            output, lse = attention_from_scores(scores * spec.scale, _gather(values, ids, shape.group_size),
                                                valid=ids >= 0)
        if past is not None and result.past_output is None:
            result.past_output, result.past_lse = retro.attend_past(keys, values, ids, past, spec.scale)
        if estimate is not None:
            output, lse = merge_attention(output, lse, estimate[0], estimate[1])
        result.output, result.lse = output, lse
        result.attend_s = time.perf_counter() - searched
        result.attend_kernel_s = parallel.take_seconds()
        return result


def _search(session: Session, queries: torch.Tensor, keys: torch.Tensor, spec: RetrieveSpec, begin: int, end: int
            ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None, str]:
    """-> ids [Hq, m] (-1 where invalid), their exact float32 scores q.k, the index's estimate, the kind used."""
    index = session.indexes[spec.layer]
    if not spec.exact and index is not None:
        found = index.search(queries, keys, spec.k, spec.scale, begin, end, spec.params)
        if found is not None:
            return found
    norms = session.layers[spec.layer].max_key_norm
    ids, scores = exact_topk(queries, keys, spec.k, begin, end, pool=spec.pool, key_norms=norms, threads=spec.threads)
    return ids, scores, None, "flat"


def candidate_topk(queries: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, k: int, begin: int,
                   end: int, threads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of given positions by exact float32 q.k: candidates int64 [Hq, C] (-1 = none; positions
    outside [begin, end) are left out, a repeated one counts once) -> (ids [Hq, min(k, C)] by decreasing
    score, -1 padded; scores, -inf padded). Compiled for bf16/fp32 stores (kvd.scan_kernels)."""
    if gather_kernels.supported(keys):
        return scan_kernels.candidate_topk(queries, keys, candidates, k, begin, end, threads)
    ids = torch.sort(candidates, dim=1).values
    valid = (ids >= begin) & (ids < end)
    valid[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    ids = ids.masked_fill(~valid, 0)
    scores = scores_at(queries, keys, ids).masked_fill(~valid, float("-inf"))
    top, order = torch.topk(scores, min(k, ids.shape[1]), dim=1)
    return torch.gather(ids, 1, order).masked_fill(torch.isneginf(top), -1), top


def _pad_rows(tensor: torch.Tensor, k: int) -> torch.Tensor:
    if tensor.shape[1] >= k:
        return tensor
    pad = torch.zeros((tensor.shape[0], k - tensor.shape[1], tensor.shape[2]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=1)


def retrieve_batch(sessions: list[Session], queries: torch.Tensor, spec: RetrieveSpec,
                   ranges: list[tuple[int, int]] | None, pool: Executor | None,
                   past: retro.PastQueries | None = None, candidates: torch.Tensor | None = None
                   ) -> list[SequenceResult]:
    """queries: float32 [n, Hq, d]; past: checked past queries of all n sequences (kvd.retro); candidates:
    int64 [n, Hq, C] (see candidate_topk). Sequences run in parallel on `pool` when there are several."""
    def one(i: int) -> SequenceResult:
        return retrieve_sequence(sessions[i], queries[i], spec, ranges[i] if ranges else None,
                                 None if past is None else past.row(i),
                                 None if candidates is None else candidates[i],
                                 None if spec.into is None else spec.into[i])

    if pool is None or len(sessions) == 1:
        return [one(i) for i in range(len(sessions))]
    return list(pool.map(one, range(len(sessions))))


def fill_slots(into: list[AttendSlots], results: list[SequenceResult]) -> None:
    """Copy into each sequence's slots the results that were not written there in place (with past queries: into
    its packed block, `index.base.packed_slots`)."""
    for slots, result in zip(into, results, strict=True):
        if result.in_place:
            continue
        slots.ids.copy_(result.ids)
        if slots.packed is not None:
            retro.fill_packed(result, slots.packed)
        else:
            slots.output.copy_(result.output)
            slots.lse.copy_(result.lse)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
