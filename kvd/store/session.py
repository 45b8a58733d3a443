"""A session: one sequence's K/V for every layer, its token ids and its index state."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvd.store.layer_kv import LayerKV
from kvd.store.rwlock import RWLock


class State(Enum):
    OPEN = "open"
    SEALED = "sealed"
    DAMAGED = "damaged"


class Tier(Enum):
    MEMORY = "memory"
    DISK = "disk"


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token over all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


@dataclass
class SessionOptions:
    index_kind: str = ""                 # "" = the daemon default
    index_params: dict[str, str] = field(default_factory=dict)
    pinned: bool = False
    ttl_seconds: int = 0
    sink_tokens: int = 0
    window_tokens: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class TokenIds:
    """Growable int64 array of the token ids a session was built from."""

    def __init__(self) -> None:
        self._ids = torch.empty(0, dtype=torch.int64)
        self.length = 0

    def write(self, start: int, ids: torch.Tensor) -> None:
        """Store ids of [start, start+len); overlapping ids must agree with what is stored."""
        end = start + ids.numel()
        if start > self.length:
            raise ValueError(f"token ids start at {start} but only {self.length} are stored")
        overlap = min(end, self.length) - start
        if overlap > 0 and not torch.equal(self._ids[start: start + overlap], ids[:overlap]):
            raise ValueError(f"token ids of positions {start}..{start + overlap} differ from the stored ones")
        if end > self._ids.numel():
            grown = torch.empty(max(end, 2 * self._ids.numel(), 1024), dtype=torch.int64)
            grown[: self.length] = self._ids[: self.length]
            self._ids = grown
        if end > self.length:
            self._ids[self.length: end] = ids[overlap:]
            self.length = end

    def view(self) -> torch.Tensor:
        return self._ids[: self.length]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def load(self, ids: torch.Tensor) -> None:
        self._ids = ids.to(torch.int64).contiguous()
        self.length = ids.numel()

    @property
    def nbytes(self) -> int:
        return self._ids.numel() * 8


class Session:
    def __init__(self, session_id: str, tenant: str, shape: ModelShape, options: SessionOptions) -> None:
        self.session_id = session_id
        self.tenant = tenant
        self.shape = shape
        self.options = options
        self.created = time.time()
        self.last_access = self.created
        self.state = State.OPEN
        self.tier = Tier.MEMORY
        self.durable_tokens = 0
        self.promotions = 0
        self.deleted = False
        self.layers = [LayerKV(shape.num_kv_heads, shape.head_dim, shape.dtype) for _ in range(shape.num_layers)]
        self.token_ids = TokenIds()
        self.lock = RWLock()
        # Serializes promotion from disk; never held while waiting for `lock`.
        self.tier_lock = threading.Lock()
        self.indexes: list = [None] * shape.num_layers  # kvd.index.manager.LayerIndex per layer, once built
        self.manifest = None        # kvd.store.records.Manifest of what the disk tier holds, if anything
        self.rewrite_from: int | None = None  # truncated below what is on disk: rewrite from here on persist
        self.damaged_reason = ""

    @property
    def disk_bytes(self) -> int:
        return self.manifest.disk_bytes if self.manifest is not None else 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.session_id)

    @property
    def layer_tokens(self) -> list[int]:
        return [layer.length for layer in self.layers]

    @property
    def num_tokens(self) -> int:
        return min(self.layer_tokens) if self.layers else 0

    @property
    def kv_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def index_bytes(self) -> int:
        return sum(index.nbytes() for index in self.indexes if index is not None)

    @property
    def memory_bytes(self) -> int:
        if self.tier is Tier.DISK:
            return 0
        return self.kv_bytes + self.index_bytes + self.token_ids.nbytes

    def touch(self) -> None:
        self.last_access = time.time()

    def offloaded_range(self, length: int) -> tuple[int, int]:
        """Positions not held on the GPU: [sink, length - window)."""
        begin = min(self.options.sink_tokens, length)
        end = max(begin, length - self.options.window_tokens)
        return begin, end
