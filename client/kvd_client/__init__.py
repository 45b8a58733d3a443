"""Client library of kvd: sessions, appends, batched retrieval, fetch, persistence.

    from kvd_client import KvdClient, merge_attention
    client = KvdClient()                      # default Unix socket; shared memory when on the same host
    client.create_session("chat-1", num_layers=32, num_kv_heads=8, num_query_heads=32, head_dim=128,
                          dtype="bf16", sink_tokens=128, window_tokens=512)
    client.append("chat-1", 0, keys, values)  # [layers, kv_heads, tokens, head_dim]
    result = client.retrieve("chat-1", layer, q, k=100)   # q: [query_heads, head_dim]
    out, lse = merge_attention(out_window, lse_window, result.output, result.lse)
"""

from kvd_client.aio import AsyncKvdClient
from kvd_client.attention import merge_attention, partial_attention
from kvd_client.client import KvdClient
from kvd_client.errors import (
    AlreadyExistsError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    KvdError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from kvd_client.prepared import PreparedRetrieve
from kvd_client.types import FetchResult, RetrieveResult, SessionInfo, Stats

__all__ = [
    "AlreadyExistsError",
    "AsyncKvdClient",
    "DataLossError",
    "FailedPreconditionError",
    "FetchResult",
    "InvalidArgumentError",
    "KvdClient",
    "KvdError",
    "NotFoundError",
    "PermissionDeniedError",
    "PreparedRetrieve",
    "ResourceExhaustedError",
    "RetrieveResult",
    "SessionInfo",
    "Stats",
    "UnauthenticatedError",
    "UnavailableError",
    "merge_attention",
    "partial_attention",
]
