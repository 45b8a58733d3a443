"""Typed results of client calls."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvd.v1 import kvd_pb2 as pb
from kvd_client import wire

INDEX_NAMES = {pb.FLAT: "flat", pb.HNSW: "hnsw", pb.GRAPH: "graph", pb.WAVE: "wave", pb.INDEX_KIND_UNSPECIFIED: ""}
INDEX_WIRE = {name: kind for kind, name in INDEX_NAMES.items() if name}
SERVED_BY_NAMES = {**INDEX_NAMES, pb.CANDIDATES: "candidates"}  # what served a Retrieve
STATE_NAMES = {pb.OPEN: "open", pb.SEALED: "sealed", pb.DAMAGED: "damaged", pb.SESSION_STATE_UNSPECIFIED: ""}
TIER_NAMES = {pb.MEMORY: "memory", pb.DISK: "disk", pb.TIER_UNSPECIFIED: ""}


@dataclass
class SessionInfo:
    session_id: str
    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    dtype: torch.dtype
    num_tokens: int
    layer_tokens: list[int]
    state: str
    tier: str
    durable_tokens: int
    memory_bytes: int
    disk_bytes: int
    index_kind: str
    sink_tokens: int
    window_tokens: int
    pinned: bool
    ttl_seconds: int
    tenant: str
    has_token_ids: bool
    promotions: int
    created_unix: float
    last_access_unix: float
    labels: dict[str, str] = field(default_factory=dict)
    index_params: dict[str, str] = field(default_factory=dict)
    indexes: list[dict] = field(default_factory=list)

    @classmethod
    def from_wire(cls, info: pb.SessionInfo) -> SessionInfo:
        shape, options = info.shape, info.options
        return cls(
            session_id=info.session_id, num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
            num_query_heads=shape.num_query_heads, head_dim=shape.head_dim,
            dtype=wire.TORCH_BY_WIRE.get(shape.dtype, torch.float16), num_tokens=info.num_tokens,
            layer_tokens=list(info.layer_tokens), state=STATE_NAMES.get(info.state, ""),
            tier=TIER_NAMES.get(info.tier, ""), durable_tokens=info.durable_tokens, memory_bytes=info.memory_bytes,
            disk_bytes=info.disk_bytes, index_kind=INDEX_NAMES.get(options.index_kind, ""),
            sink_tokens=options.sink_tokens, window_tokens=options.window_tokens, pinned=options.pinned,
            ttl_seconds=options.ttl_seconds, tenant=info.tenant, has_token_ids=info.has_token_ids,
            promotions=info.promotions, created_unix=info.created_unix, last_access_unix=info.last_access_unix,
            labels=dict(options.labels), index_params=dict(options.index_params),
            indexes=[{"layer": i.layer, "kind": INDEX_NAMES.get(i.kind, ""), "ready": i.ready,
                      "indexed_tokens": i.indexed_tokens, "bytes": i.bytes,
                      "from_hints": i.from_hints, "error": i.error} for i in info.indexes],
        )


@dataclass
class RetrieveResult:
    """Results of one Retrieve call over n sequences and Hq query heads.

    ids:    int64 [n, Hq, k] token positions ordered by decreasing score (-1 where fewer than k keys exist)
    keys, values: [n, Hq, k, head_dim] in the session dtype (mode "ids_kv")
    output: float32 [n, Hq, head_dim], attention over the retrieved keys (mode "attention")
    lse:    float32 [n, Hq], log-sum-exp of the scaled scores of those keys (-inf for an empty set)
    past_output, past_lse: with past queries, float32 [n, P, Hq, head_dim] and [n, P, Hq]: each past query's
            partial attention over the keys it had not seen yet (lse -inf when none)
    packed: with past queries and packed=True, float32 [n, P + 1, Hq, head_dim + 1] instead of output, lse,
            past_output and past_lse (None then): row p < P is past query p's, row P the current query's, the
            log-sum-exp in the last column
    """

    ids: torch.Tensor
    counts: list[int]
    index_kinds: list[str]
    server_ms: float
    promoted: list[bool]
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    output: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    past_output: torch.Tensor | None = None
    past_lse: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    search_ms: float = 0.0  # of server_ms: finding the keys (index search or exact scan), summed over sequences
    attend_ms: float = 0.0  # of server_ms: attending them
    search_kernel_ms: float = 0.0  # of search_ms / attend_ms: inside the daemon's compiled parallel regions
    attend_kernel_ms: float = 0.0


@dataclass
class FetchResult:
    keys: torch.Tensor        # [n_layers, num_kv_heads, end - begin, head_dim]
    values: torch.Tensor
    begin: int
    end: int
    token_ids: torch.Tensor | None = None


@dataclass
class Stats:
    version: str
    uptime_seconds: float
    sessions: int
    sessions_in_memory: int
    sessions_on_disk: int
    memory_bytes: int
    memory_budget_bytes: int
    disk_bytes: int
    disk_budget_bytes: int
    shared_memory_regions: int
    index_build_queue: int
    counters: dict[str, float]

    @classmethod
    def from_wire(cls, reply: pb.StatsResponse) -> Stats:
        return cls(reply.version, reply.uptime_seconds, reply.sessions, reply.sessions_in_memory,
                   reply.sessions_on_disk, reply.memory_bytes, reply.memory_budget_bytes, reply.disk_bytes,
                   reply.disk_budget_bytes, reply.shared_memory_regions, reply.index_build_queue,
                   dict(reply.counters))
