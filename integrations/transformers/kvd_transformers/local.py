"""An in-process stand-in for `kvd_client.KvdClient` with the same surface the integration uses.

It stores each session's K/V in plain tensors and answers `retrieve` by an exact scan (exact top-k per query
head, then partial attention with log-sum-exp). It exists to develop and unit-test the integration without a
daemon and as a correctness reference; production code talks to the real daemon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


class LocalNotFoundError(LookupError):
    """Raised for an unknown session (the real client raises kvd_client.errors.NotFoundError)."""


@dataclass
class LocalSessionInfo:
    session_id: str
    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    dtype: torch.dtype
    num_tokens: int
    layer_tokens: list[int]
    sink_tokens: int
    window_tokens: int


@dataclass
class LocalRetrieveResult:
    ids: torch.Tensor
    counts: list[int]
    output: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    past_output: torch.Tensor | None = None
    past_lse: torch.Tensor | None = None
    packed: torch.Tensor | None = None


@dataclass
class LocalFetchResult:
    keys: torch.Tensor
    values: torch.Tensor
    begin: int
    end: int
    token_ids: torch.Tensor | None = None


@dataclass
class _Session:
    info: LocalSessionInfo
    keys: list[torch.Tensor] = field(default_factory=list)    # per layer [Hkv, T, D]
    values: list[torch.Tensor] = field(default_factory=list)
    hints: list[Any] = field(default_factory=list)


class LocalKvdClient:
    """Exact, in-memory reference implementation of the client calls used by KVDCache."""

    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}
        self.calls: dict[str, int] = {"append": 0, "retrieve": 0, "fetch": 0}

    def create_session(self, session_id: str, *, num_layers: int, num_kv_heads: int, num_query_heads: int,
                       head_dim: int, dtype: torch.dtype = torch.bfloat16, index: str | None = None,
                       sink_tokens: int = 0, window_tokens: int = 0, exist_ok: bool = False,
                       pinned: bool = False, ttl_seconds: int = 0,
                       index_params: dict[str, str] | None = None) -> LocalSessionInfo:
        if session_id in self.sessions:
            if not exist_ok:
                raise ValueError(f"session {session_id!r} exists")
            return self.get_session(session_id)
        info = LocalSessionInfo(session_id, num_layers, num_kv_heads, num_query_heads, head_dim, dtype, 0,
                                [0] * num_layers, sink_tokens, window_tokens)
        empty = torch.empty(num_kv_heads, 0, head_dim, dtype=dtype)
        self.sessions[session_id] = _Session(info, [empty] * num_layers, [empty] * num_layers)
        return self.get_session(session_id)

    def _session(self, session_id: str) -> _Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise LocalNotFoundError(session_id) from None

    def get_session(self, session_id: str) -> LocalSessionInfo:
        s = self._session(session_id)
        s.info.layer_tokens = [k.shape[1] for k in s.keys]
        s.info.num_tokens = min(s.info.layer_tokens) if s.info.layer_tokens else 0
        return s.info

    def delete_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def append(self, session_id: str, start: int, keys: Any, values: Any, *, layers: list[int] | None = None,
               token_ids: Any = None, hint_queries: Any = None, hint_topn: Any = None) -> None:
        self.calls["append"] += 1
        s = self._session(session_id)
        keys, values = torch.as_tensor(keys), torch.as_tensor(values)
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        layers = list(range(s.info.num_layers)) if layers is None else layers
        for i, layer in enumerate(layers):
            if s.keys[layer].shape[1] != start:
                raise ValueError(f"layer {layer} has {s.keys[layer].shape[1]} tokens, append starts at {start}")
            s.keys[layer] = torch.cat([s.keys[layer], keys[i].to(s.info.dtype)], dim=1)
            s.values[layer] = torch.cat([s.values[layer], values[i].to(s.info.dtype)], dim=1)
        if hint_queries is not None:
            s.hints.append((list(layers), hint_queries, hint_topn))

    def retrieve(self, session_ids: str | list[str], layer: int, queries: Any, *, k: int,
                 mode: str = "attention", ranges: list[tuple[int, int]] | None = None,
                 scale: float | None = None, exact: bool = False, search_params: dict[str, Any] | None = None,
                 past_queries: Any = None, past_seen_ids: Any = None, past_seen_from: Any = None,
                 packed: bool = False, past_in_queries: int = 0) -> LocalRetrieveResult:
        """search_params: accepted for KvdClient's signature; retrieval here is always exact."""
        self.calls["retrieve"] += 1
        if isinstance(session_ids, str):
            session_ids = [session_ids]
        q = torch.as_tensor(queries).float()
        if q.dim() == (3 if past_in_queries else 2):
            q = q.unsqueeze(0)
        if past_in_queries:  # KvdClient's stacked past queries: [n, P + 1, Hq, D], the current query last
            past_queries, q = q[:, :past_in_queries], q[:, past_in_queries]
        n, hq, d = q.shape
        scale = scale if scale else 1.0 / math.sqrt(d)
        ids = torch.full((n, hq, k), -1, dtype=torch.int64)
        out = torch.zeros(n, hq, d)
        lse = torch.full((n, hq), float("-inf"))
        counts = []
        for i, sid in enumerate(session_ids):
            s = self._session(sid)
            kk, vv = s.keys[layer].float(), s.values[layer].float()
            length = kk.shape[1]
            if ranges is None:
                begin, end = s.info.sink_tokens, max(s.info.sink_tokens, length - s.info.window_tokens)
            else:
                begin, end = ranges[i]
                end = length if end == 0 else end
            if not 0 <= begin <= end <= length:
                raise ValueError(f"range [{begin}, {end}) outside {length} tokens")
            kept = min(k, end - begin)
            counts.append(kept)
            if kept == 0:
                continue
            g = hq // kk.shape[0]
            kr = kk[:, begin:end].repeat_interleave(g, dim=0)  # [Hq, R, D]
            vr = vv[:, begin:end].repeat_interleave(g, dim=0)
            scores = torch.einsum("hd,hrd->hr", q[i], kr) * scale
            top = torch.topk(scores, kept, dim=-1).indices  # [Hq, kept]
            ids[i, :, :kept] = top + begin
            sel = torch.gather(scores, 1, top)
            lse[i] = torch.logsumexp(sel, dim=-1)
            p = torch.exp(sel - lse[i].unsqueeze(-1))
            out[i] = torch.einsum("hk,hkd->hd", p, torch.gather(vr, 1, top.unsqueeze(-1).expand(-1, -1, d)))
        result = LocalRetrieveResult(ids=ids, counts=counts, output=out, lse=lse)
        if past_queries is not None:
            result.past_output, result.past_lse = self._past(session_ids, layer, ids, past_queries, past_seen_ids,
                                                             past_seen_from, scale)
            if packed:  # KvdClient's packed reply: [n, P + 1, Hq, D + 1], lse in the last column
                rows = torch.cat([result.past_output, out.unsqueeze(1)], dim=1)
                lses = torch.cat([result.past_lse, lse.unsqueeze(1)], dim=1)
                result = LocalRetrieveResult(ids=ids, counts=counts,
                                             packed=torch.cat([rows, lses.unsqueeze(-1)], dim=-1))
        return result

    def _past(self, session_ids: list[str], layer: int, ids: torch.Tensor, queries: Any, seen_ids: Any,
              seen_from: Any, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """RetroAttention's past queries [n, P, Hq, D]: attention over the retrieved ids each has not seen."""
        pq = torch.as_tensor(queries).float()
        n, count, hq, d = pq.shape
        out = torch.zeros(n, count, hq, d)
        lse = torch.full((n, count, hq), float("-inf"))
        for i, sid in enumerate(session_ids):
            s = self._session(sid)
            g = hq // s.info.num_kv_heads
            for p in range(count):
                bound = math.inf if seen_from is None else int(torch.as_tensor(seen_from)[i, p])
                for h in range(hq):
                    seen = set() if seen_ids is None else set(torch.as_tensor(seen_ids)[i, p, h].tolist())
                    new = [j for j in ids[i, h].tolist() if 0 <= j < bound and j not in seen]
                    if not new:
                        continue
                    scores = s.keys[layer][h // g, new].float() @ pq[i, p, h] * scale
                    lse[i, p, h] = torch.logsumexp(scores, 0)
                    out[i, p, h] = torch.softmax(scores, 0) @ s.values[layer][h // g, new].float()
        return out, lse

    def fetch(self, session_id: str, begin: int = 0, end: int | None = None, layers: list[int] | None = None,
              with_token_ids: bool = False) -> LocalFetchResult:
        self.calls["fetch"] += 1
        s = self._session(session_id)
        layers = list(range(s.info.num_layers)) if layers is None else layers
        length = min(s.keys[layer].shape[1] for layer in layers)
        end = length if end is None or end == 0 else end
        keys = torch.stack([s.keys[layer][:, begin:end] for layer in layers])
        values = torch.stack([s.values[layer][:, begin:end] for layer in layers])
        return LocalFetchResult(keys, values, begin, end)

    def truncate(self, session_id: str, num_tokens: int) -> LocalSessionInfo:
        s = self._session(session_id)
        s.keys = [k[:, :num_tokens] for k in s.keys]
        s.values = [v[:, :num_tokens] for v in s.values]
        return self.get_session(session_id)

    def persist(self, session_id: str, seal: bool = False) -> None:
        self._session(session_id)
