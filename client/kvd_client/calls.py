"""Request construction and reply decoding shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvd.v1 import kvd_pb2 as pb
from kvd_client import wire
from kvd_client.transport import Placer
from kvd_client.types import INDEX_WIRE, SERVED_BY_NAMES, FetchResult, RetrieveResult

MODES = {"ids": pb.IDS, "ids_kv": pb.IDS_KV, "attention": pb.ATTENTION}
_SLACK = 64 * 8


def nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size() + 64


def create_request(session_id: str, *, num_layers: int, num_kv_heads: int, num_query_heads: int | None,
                   head_dim: int, dtype: torch.dtype | str, index: str | None, sink_tokens: int,
                   window_tokens: int, exist_ok: bool, pinned: bool, ttl_seconds: int,
                   index_params: dict[str, Any] | None, labels: dict[str, str] | None) -> pb.CreateSessionRequest:
    if index and index not in INDEX_WIRE:
        raise ValueError(f"unknown index kind {index!r}; use one of {sorted(INDEX_WIRE)}")
    torch_dtype = wire.to_dtype(dtype)
    if torch_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"K/V dtype must be float16, bfloat16 or float32, not {torch_dtype}")
    shape = pb.ModelShape(num_layers=num_layers, num_kv_heads=num_kv_heads,
                          num_query_heads=num_query_heads or num_kv_heads, head_dim=head_dim,
                          dtype=wire.WIRE_BY_TORCH[torch_dtype])
    options = pb.SessionOptions(index_kind=INDEX_WIRE.get(index or "", pb.INDEX_KIND_UNSPECIFIED),
                                index_params={k: str(v) for k, v in (index_params or {}).items()},
                                pinned=pinned, ttl_seconds=ttl_seconds, sink_tokens=sink_tokens,
                                window_tokens=window_tokens, labels=labels or {})
    return pb.CreateSessionRequest(session_id=session_id, shape=shape, options=options, exist_ok=exist_ok)


def normalize_kv(keys: Any, values: Any, layers: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = wire.as_torch(keys), wire.as_torch(values)
    if keys.dim() == 3:
        if layers is None or len(layers) != 1:
            raise ValueError("3-d keys [num_kv_heads, n_tokens, head_dim] need layers=[one layer]")
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
    return keys, values


def append_chunks(keys: torch.Tensor, max_bytes: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) so that each Append carries at most max_bytes of K+V."""
    per_token = 2 * keys.shape[0] * keys.shape[1] * keys.shape[3] * keys.element_size()
    step = max(1, max_bytes // max(1, per_token))
    n = keys.shape[2]
    return [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]


def append_request(placer: Placer, session_id: str, start: int, keys: torch.Tensor, values: torch.Tensor,
                   layers: Sequence[int] | None, token_ids: Any, hint_queries: Any, hint_topn: Any
                   ) -> pb.AppendRequest:
    request = pb.AppendRequest(session_id=session_id, start=start, layers=list(layers or []),
                               keys=placer.tensor(keys), values=placer.tensor(values))
    if token_ids is not None:
        request.token_ids.extend(int(t) for t in wire.as_torch(token_ids).reshape(-1).tolist())
    if hint_queries is not None:
        request.hints.queries.CopyFrom(placer.tensor(wire.as_torch(hint_queries)))
    if hint_topn is not None:
        request.hints.topn_ids.CopyFrom(placer.tensor(wire.as_torch(hint_topn)))
    return request


def normalize_queries(session_ids: str | Sequence[str], queries: Any, stacked: int = 0
                      ) -> tuple[list[str], torch.Tensor, bool]:
    """`stacked` P: queries hold P past queries before the current one ([n, P + 1, Hq, d])."""
    single = isinstance(session_ids, str)
    ids = [session_ids] if single else list(session_ids)
    tensor = wire.as_torch(queries)
    if single and tensor.dim() == (3 if stacked else 2):
        tensor = tensor.unsqueeze(0)
    return ids, tensor.contiguous(), single


def retrieve_output_bytes(n: int, heads: int, k: int, head_dim: int, mode: str, kv_element: int, past: int = 0
                          ) -> int:
    size = n * heads * k * 8 + _SLACK
    if mode == "ids_kv":
        size += 2 * n * heads * k * head_dim * kv_element
    elif mode == "attention":
        size += (1 + past) * (n * heads * head_dim * 4 + n * heads * 4) + (2 * 64 if past else 0)
    return size


def normalize_candidates(single: bool, candidates: Any) -> torch.Tensor | None:
    """Candidate positions as a CPU int tensor with the batch axis (added for a single session id)."""
    if candidates is None:
        return None
    tensor = wire.as_torch(candidates)
    if tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"candidates must be int32 or int64 positions, not {tensor.dtype}")
    return (tensor.unsqueeze(0) if single and tensor.dim() == 2 else tensor).contiguous()


def normalize_past(single: bool, past_queries: Any, past_seen_ids: Any, past_seen_from: Any, stacked: int = 0
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
    """Past-query tensors as CPU tensors with the batch axis (added for a single session id); with `stacked`
    the past queries are in the queries tensor (past_queries must be None)."""
    if stacked and past_queries is not None:
        raise ValueError("past_queries and past_in_queries are exclusive")
    if past_queries is None and not stacked:
        if past_seen_ids is not None or past_seen_from is not None:
            raise ValueError("past_seen_ids and past_seen_from need past queries")
        return None
    tensors = [None if t is None else wire.as_torch(t).contiguous() for t in (past_queries, past_seen_ids,
                                                                             past_seen_from)]
    if single:
        tensors = [None if t is None else t.unsqueeze(0) for t in tensors]
    queries, seen_ids, seen_from = tensors
    return queries, seen_ids, seen_from


def retrieve_request(placer: Placer, session_ids: list[str], layer: int, queries: torch.Tensor, k: int, mode: str,
                     ranges: Sequence[tuple[int, int]] | None, scale: float | None, exact: bool,
                     search_params: dict[str, Any] | None,
                     past: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None,
                     packed: bool = False, stacked: int = 0,
                     candidates: torch.Tensor | None = None) -> pb.RetrieveRequest:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    request = pb.RetrieveRequest(session_ids=session_ids, layer=layer, queries=placer.tensor(queries), k=k,
                                 mode=MODES[mode], scale=scale or 0.0, exact=exact,
                                 search_params={key: str(v) for key, v in (search_params or {}).items()})
    if ranges is not None:
        request.ranges.extend(pb.TokenRange(begin=b, end=e) for b, e in ranges)
    if past is not None:
        queries_p, seen_ids, seen_from = past
        if queries_p is not None:
            request.past.queries.CopyFrom(placer.tensor(queries_p))
        if stacked:
            request.past.stacked = stacked
        if seen_ids is not None:
            request.past.seen_ids.CopyFrom(placer.tensor(seen_ids))
        if seen_from is not None:
            request.past.seen_from.CopyFrom(placer.tensor(seen_from))
        if packed:
            request.past.packed = True
    if candidates is not None:
        request.candidates.CopyFrom(placer.tensor(candidates))
    output = placer.output_ref()
    if output is not None:
        request.output.CopyFrom(output)
    return request


def retrieve_result(reply: pb.RetrieveResponse, placer: Placer, single: bool) -> RetrieveResult:
    def read(message: pb.Tensor) -> torch.Tensor | None:
        tensor = placer.read(message)
        return tensor[0] if (single and tensor is not None) else tensor

    return RetrieveResult(
        ids=read(reply.ids), counts=list(reply.counts),
        index_kinds=[SERVED_BY_NAMES.get(k, "") for k in reply.index_kinds],
        server_ms=reply.server_ms, promoted=list(reply.promoted), keys=read(reply.keys), values=read(reply.values),
        output=read(reply.output), lse=read(reply.lse), past_output=read(reply.past_output),
        past_lse=read(reply.past_lse), packed=read(reply.packed), search_ms=reply.search_ms,
        attend_ms=reply.attend_ms, search_kernel_ms=reply.search_kernel_ms, attend_kernel_ms=reply.attend_kernel_ms,
    )


def fetch_output_bytes(n_layers: int, kv_heads: int, tokens: int, head_dim: int, element: int) -> int:
    return 2 * n_layers * kv_heads * tokens * head_dim * element + _SLACK


def fetch_request(placer: Placer, session_id: str, begin: int, end: int | None, layers: Sequence[int] | None,
                  with_token_ids: bool) -> pb.FetchRequest:
    request = pb.FetchRequest(session_id=session_id, layers=list(layers or []), begin=begin, end=end or 0,
                              with_token_ids=with_token_ids)
    output = placer.output_ref()
    if output is not None:
        request.output.CopyFrom(output)
    return request


def fetch_result(reply: pb.FetchResponse, placer: Placer, with_token_ids: bool) -> FetchResult:
    token_ids = torch.tensor(list(reply.token_ids), dtype=torch.int64) if with_token_ids else None
    return FetchResult(keys=placer.read(reply.keys), values=placer.read(reply.values), begin=reply.begin,
                       end=reply.end, token_ids=token_ids)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

