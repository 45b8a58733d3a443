"""KVDLayer: one layer's device buffer `[sink | window]` (slots [0, s) are positions [0, s); the last slots are
the newest positions), with host staging for queries and results, and which token positions the resident
slots hold (for masks and the resident-only attention)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin


@dataclass
class Job:
    end: int            # the layer holds tokens [0, end) in kvd once the job is done
    future: Future[None]


class QueryStage:
    """Reused host buffers for queries on their way to kvd: pinned, filled by an asynchronous copy whose arrival
    a CUDA event marks (queries on the CPU are passed through as float32). One buffer per shape: a retro step's
    queries (the P cached ones, then the new one) change shape while its output cache fills, and pinned memory is
    slow to allocate."""

    def __init__(self) -> None:
        self.hosts: dict[tuple[int, ...], tuple[torch.Tensor, Any]] = {}

    def put(self, q: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """q [..., D] -> (float32 host tensor of its shape, the event to wait for before reading it, or None)."""
        if q.device.type != "cuda":
            return q.float().contiguous(), None
        got = self.hosts.get(tuple(q.shape))
        if got is None:
            got = self.hosts[tuple(q.shape)] = (torch.empty(q.shape, dtype=torch.float32, pin_memory=True),
                                                torch.cuda.Event())
        host, event = got
        host.copy_(q, non_blocking=True)
        event.record()
        return host, event


class KVDLayer(CacheLayerMixin):
    """Device-resident part of one layer: `[sink | window]` buffers plus kvd bookkeeping."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, sink: int, window: int, flush: int) -> None:
        super().__init__()
        self.sink, self.window, self.flush = sink, window, flush
        self.buf_k: torch.Tensor | None = None  # [B, Hkv, cap, D]
        self.buf_v: torch.Tensor | None = None
        self.used = 0         # occupied slots
        self.total = 0        # tokens seen (sequence length)
        self.submitted = 0    # tokens handed to the appender
        self.confirmed = 0    # tokens known to be in kvd
        self.jobs: deque[Job] = deque()
        self.keep_all = False  # all tokens resident (exact multi-forward prefill)
        self.consumed = True   # the last update was read by the kvd attention function
        self.pending_new = 0   # tokens written by the last multi-token update, not yet trimmed
        self.host_init: tuple[torch.Tensor, torch.Tensor] | None = None  # rehydrated [B, Hkv, used, D] on CPU
        self.query_stage = QueryStage()
        self.copy_event: Any = None        # last device-to-host copy of this layer's slots
        self.hint_q: torch.Tensor | None = None  # prefill query sample awaiting its final top-N
        self.hints_until = 0  # the append carrying the index hints ends here (awaited before the next Retrieve)
        self.r_host: torch.Tensor | None = None

    # --- CacheLayerMixin API -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        cap = self.sink + self.window + self.flush
        self.dtype, self.device = key_states.dtype, key_states.device
        self.buf_k = key_states.new_empty(b, h, cap, d)
        self.buf_v = value_states.new_empty(b, h, cap, d)
        if self.host_init is not None:
            hk, hv = self.host_init
            n = hk.shape[2]
            self.buf_k[:, :, :n].copy_(hk)
            self.buf_v[:, :, :n].copy_(hv)
            self.host_init = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("KVDLayer.update is driven by KVDCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.total + query_length, 0

    def get_seq_length(self) -> int:
        return self.total

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.buf_k = self.buf_v = None
        self.keys = self.values = None
        self.used = self.total = self.submitted = self.confirmed = 0
        self.jobs.clear()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVDCache does not support beam search (sessions are per sequence)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.total:
            raise NotImplementedError("KVDCache cannot repeat a non-empty batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("KVDCache does not support selecting batch rows")

    # --- host staging for the decode round trip (reused every step; pinned on CUDA) ------------------------
    def stage_query(self, query: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """query [B, Hq, 1, D] -> float32 host copy [B, Hq, D] (+ a CUDA event marking its arrival)."""
        return self.query_stage.put(query[:, :, 0])

    def stage_result(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """(out [B, Hq, D], lse [B, Hq]) -> one host tensor [B, Hq, D + 1] ready for a single copy."""
        shape = (*out.shape[:-1], out.shape[-1] + 1)
        host = self.r_host
        if host is None or host.shape != shape:
            host = self.r_host = torch.empty(shape, dtype=torch.float32, pin_memory=torch.cuda.is_available())
        host[..., :-1].copy_(out)
        host[..., -1].copy_(lse)
        return host

    # --- layout helpers -----------------------------------------------------------------------------------
    @property
    def sink_len(self) -> int:
        return min(self.total, self.sink)

    @property
    def win_len(self) -> int:
        return self.used - self.sink_len

    def offloaded_end(self) -> int:
        """Offloaded range is [sink, offloaded_end) (empty when offloaded_end <= sink)."""
        return self.total - self.win_len

    def ensure_capacity(self, slots: int) -> None:
        assert self.buf_k is not None and self.buf_v is not None
        cap = self.buf_k.shape[2]
        if slots <= cap:
            return
        new_cap = max(slots, int(cap * 1.5))
        b, h, _, d = self.buf_k.shape
        nk = self.buf_k.new_empty(b, h, new_cap, d)
        nv = self.buf_v.new_empty(b, h, new_cap, d)
        nk[:, :, :self.used].copy_(self.buf_k[:, :, :self.used])
        nv[:, :, :self.used].copy_(self.buf_v[:, :, :self.used])
        self.buf_k, self.buf_v = nk, nv

    def pending_slots(self) -> tuple[int, int]:
        """Slots holding the tokens not yet handed to the appender ([submitted, total) positions)."""
        n = self.total - self.submitted
        return self.used - n, self.used


def resident_positions(layer: KVDLayer) -> torch.Tensor | None:
    """Token positions of the resident slots, or None when slots == positions."""
    if layer.used == layer.total:
        return None
    s = layer.sink_len
    w = layer.win_len
    return torch.cat([torch.arange(s), torch.arange(layer.total - w, layer.total)])


def resident_padding(mask: Any, layer: KVDLayer) -> torch.Tensor | None:
    padding = getattr(mask, "padding", None)
    if padding is None:
        return None
    pos = resident_positions(layer)
    if pos is None:
        return padding[:, :layer.total]
    return padding[:, pos.to(padding.device)]


def resident_valid(mask: Any, layer: KVDLayer) -> torch.Tensor | None:
    """Decode: which resident slots each row may attend ([B, 1, 1, used] bool), None when all."""
    padding = getattr(mask, "padding", None)
    if padding is None:
        return None
    key = (layer.sink_len, layer.win_len, layer.total)
    memo: dict[tuple[int, int, int], torch.Tensor] = mask.memo
    got = memo.get(key)
    if got is None:
        got = resident_padding(mask, layer)[:, None, None, :]  # type: ignore[index]
        memo[key] = got
    return got
