"""KVDCache: a transformers `Cache` that keeps only the sink and the recent window of every layer on the
device and hands everything else to kvd.

Per layer, the device buffer holds `[sink | window]`: slots [0, s) are token positions [0, s) with
s = min(total, sink_tokens); slots [s, used) are the last w = used - s positions [total - w, total). Every
token is appended to the kvd session (prefill: streamed per layer as soon as its K/V exist; decode: batched
every `flush_tokens` steps, all layers in one call), from a background thread, so the session always holds the
whole sequence and a later turn (or a restarted process) can continue it. The offloaded part that the
attention function asks kvd about is [sink_tokens, total - w); it is always already appended (the window
keeps >= window_tokens >= flush_tokens tokens, and the cache waits for the append before dropping tokens).

The attention itself lives in `kvd_transformers.attention` (registered as attn_implementation "kvd"); the
cache's `update` only places the new K/V and returns the device-resident keys/values.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache

from kvd_transformers import ops
from kvd_transformers.config import CacheStats, KVDConfig
from kvd_transformers.launch_ahead import RegisteredPlan, StreamWaiter, ahead_threads, stream_waiter
from kvd_transformers.layer import Job, KVDLayer, resident_padding, resident_valid
from kvd_transformers.lookahead import LookaheadState
from kvd_transformers.retro import RetroLayer, RetroState


class _UpdateToken:
    """What `update` left for the attention function: identifies the call by the returned key tensor."""

    __slots__ = ("cache", "key", "layer_idx")

    def __init__(self, cache: KVDCache, layer_idx: int, key: torch.Tensor) -> None:
        self.cache, self.layer_idx, self.key = cache, layer_idx, key


_last_update = threading.local()
_forward_inputs = threading.local()  # input ids of the current forward (set by the hook that enable() adds)


def note_input_ids(input_ids: torch.Tensor | None) -> None:
    """Remember the token ids of the forward about to run (the cache stores them in the session)."""
    _forward_inputs.ids = input_ids


def take_update(key: torch.Tensor) -> tuple[KVDCache, int] | None:
    """Called by the attention function: the cache and layer whose `update` returned `key`, if any."""
    token: _UpdateToken | None = getattr(_last_update, "token", None)
    if token is None or token.key is not key:
        return None
    _last_update.token = None
    return token.cache, token.layer_idx


_PLANS_KEPT = 16  # prepared plans per cache (plain decode, retro's past counts and seen widths)


def _run_plan(plan: Any, layer_idx: int, q_host: torch.Tensor, ranges: list[tuple[int, int]],
              write_past: Callable[[Any], None] | None, keep: bool) -> Any:
    """One decode Retrieve as a run of its prepared plan: the queries (with RetroAttention's past queries stacked
    below the new one) written into the plan's shared memory, `write_past` the rest of the past queries' inputs
    (seen ids and bounds), then the run. The result's tensors are views that the plan's next run rewrites: with
    `keep` (something holds on to the result: the retro cache its ids, a debug log), and always with past queries,
    they are copied out."""
    plan.queries.copy_(q_host)
    if write_past is None:
        res = plan.run(layer_idx, ranges)
        return replace(res, ids=res.ids.clone(), output=res.output.clone(), lse=res.lse.clone()) if keep else res
    write_past(plan)
    res = plan.run(layer_idx, ranges)
    return replace(res, ids=res.ids.clone(), packed=res.packed.clone())


class KVDCache(Cache):
    """A transformers Cache backed by kvd. One kvd session per batch row.

    Args:
        client: a `kvd_client.KvdClient` (or anything with the same methods, e.g. `LocalKvdClient`).
        session: session id (batch 1), a list of ids (one per batch row) or None (ids generated on first use).
            An existing session is continued: its sink and window are fetched onto the device and its length
            becomes the cache length (pass the full token history to `generate`; only new tokens are computed).
        config: a `KVDConfig`; keyword overrides of its fields are accepted too.
    """

    def __init__(self, client: Any, session: str | Sequence[str] | None = None, *,
                 config: KVDConfig | None = None, **overrides: Any) -> None:
        super().__init__(layers=[])
        cfg = replace(config or KVDConfig(), **overrides)
        if cfg.retro and cfg.hold_tokens < cfg.retro_window - 1:
            cfg = replace(cfg, hold_tokens=cfg.retro_window - 1)
        cfg.validate()
        self.client = client
        self.config = cfg
        self.session_ids: list[str] | None = (
            None if session is None else [session] if isinstance(session, str) else list(session))
        self.is_open = False
        self.num_layers = 0
        self.batch = 0
        self.stats = CacheStats()
        self.retrieve_log: list[Any] | None = None  # debug: set to [] to record (layer, result) of each Retrieve
        self.retro = RetroState(cfg.retro_window) if cfg.retro else None
        self._appender = ThreadPoolExecutor(1, thread_name_prefix="kvd-append") if cfg.async_append else None
        self._retriever = ThreadPoolExecutor(1, thread_name_prefix="kvd-retrieve") if cfg.overlap else None
        self.lookahead = LookaheadState(client, cfg.lookahead_candidates, self.stats,
                                        cfg.lookahead_params) if cfg.lookahead else None
        self._finalizer = weakref.finalize(self, _shutdown, self._appender, self._retriever,
                                           None if self.lookahead is None else self.lookahead.worker)
        self._ids: list[tuple[int, torch.Tensor]] = []  # recorded token ids (start position, [B, n])
        self._ids_ok = True
        self._error: BaseException | None = None
        self._ranges_cache: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self._stream: Any = None  # CUDA side stream of the device-to-host copies
        self._plans: dict[tuple[Any, ...], Any] = {}  # the decode Retrieves' prepared plans (config.prepared)
        self._registered: dict[int, RegisteredPlan] = {}  # id(plan) -> its region registered (launch_ahead)
        self._settings_memo: tuple[Any, ...] | None = None  # _plan_settings
        # the plan whose started run the device waits on (launch_ahead), and what to do with its reply
        self._ahead_started: tuple[Any, Callable[[Any], None] | None] | None = None
        self._ahead_event: Any = None  # marks the query's copy into the plan's region (launch_ahead)
        self._ahead_device = False  # the model's device offers launch-ahead (set when the cache opens)
        self._decode_forwards = 0  # completed decode forwards (launch-ahead waits for the first: CUDA's lazy
        #                            module loading may wait for the stream, which must not wait on kvd then)
        if self.session_ids:
            self._rehydrate()

    # --- generic Cache API ---------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not self.layers:
            return 0
        return self.layers[min(layer_idx, len(self.layers) - 1)].total

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last |tokens_to_remove| tokens (a negative count, transformers 5.23 style; a positive
        value is read as the length to keep, the older style). Only tokens still in the window can go."""
        if not self.layers:
            return
        total = self.layers[0].total
        keep = total + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        drop = total - keep
        if drop <= 0:
            return
        if any(drop > layer.win_len for layer in self.layers):
            raise NotImplementedError("KVDCache can only crop tokens that are still in the device window")
        self.flush()
        if self.retro is not None:
            self.retro.reset()
        for layer in self.layers:
            layer.used -= drop
            layer.total -= drop
            layer.submitted = min(layer.submitted, layer.total)
            layer.confirmed = min(layer.confirmed, layer.total)
        self._ids = [(pos, ids[:, :keep - pos]) for pos, ids in self._ids if pos < keep]
        if self.is_open and self.session_ids:
            for sid in self.session_ids:
                self.client.truncate(sid, keep)

    # --- sessions --------------------------------------------------------------------------------------------
    def _rehydrate(self) -> None:
        """Continue existing sessions: fetch sink + window of every layer (kept on CPU until the first update
        reveals the device)."""
        assert self.session_ids is not None
        infos = []
        for sid in self.session_ids:
            try:
                infos.append(self.client.get_session(sid))
            except Exception as exc:
                if _is_not_found(exc):
                    infos.append(None)
                    continue
                raise
        existing = [i for i in infos if i is not None]
        if not existing:
            return
        if len(existing) != len(infos):
            raise ValueError("either all or none of the batch's sessions may exist")
        lengths = set()
        for sid, info in zip(self.session_ids, existing, strict=True):
            n = int(info.num_tokens)
            if any(int(t) != n for t in info.layer_tokens):
                # an interrupted append left layers uneven: keep the common prefix
                info = self.client.truncate(sid, n) or info
            lengths.add(n)
        if len(lengths) != 1:
            raise ValueError(f"sessions of one batch must have equal lengths to be continued together: {lengths}")
        total = lengths.pop()
        if total == 0:
            return
        if not all(getattr(info, "has_token_ids", True) for info in existing):
            self._ids_ok = False  # the stored part has no token ids: record none for the continuation
        cfg = self.config
        self.num_layers = int(existing[0].num_layers)
        sink = min(total, cfg.sink_tokens)
        wbegin = max(sink, total - cfg.window_tokens)
        parts_k: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        parts_v: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        for sid in self.session_ids:
            pieces_k, pieces_v = [], []
            for begin, end in ((0, sink), (wbegin, total)):
                if end > begin:
                    res = self.client.fetch(sid, begin, end)
                    pieces_k.append(torch.as_tensor(res.keys))
                    pieces_v.append(torch.as_tensor(res.values))
            k = torch.cat(pieces_k, dim=2)  # [L, Hkv, used, D]
            v = torch.cat(pieces_v, dim=2)
            for layer in range(self.num_layers):
                parts_k[layer].append(k[layer])
                parts_v[layer].append(v[layer])
        for layer in range(self.num_layers):
            lay = KVDLayer(cfg.sink_tokens, cfg.window_tokens, cfg.flush_tokens)
            lay.host_init = (torch.stack(parts_k[layer]), torch.stack(parts_v[layer]))
            lay.used = lay.host_init[0].shape[2]
            lay.total = lay.submitted = lay.confirmed = total
            self.layers.append(lay)

    def _open(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        """First attention call: learn the model shape, create (or check) the sessions."""
        config = module.config
        self.num_layers = int(config.num_hidden_layers)
        b, hq, _, d = query.shape
        hkv = key.shape[1]
        self.batch = b
        self._ahead_device = self._waiter(query.device) is not None
        if self.session_ids is None:
            self.session_ids = [f"kvd-{uuid.uuid4().hex}" for _ in range(b)]
        if len(self.session_ids) != b:
            raise ValueError(f"KVDCache has {len(self.session_ids)} session ids for a batch of {b}")
        dtype = self.config.kv_dtype or key.dtype
        for sid in self.session_ids:
            info = self.client.create_session(
                sid, num_layers=self.num_layers, num_kv_heads=hkv, num_query_heads=hq, head_dim=d, dtype=dtype,
                index=self.config.index, sink_tokens=self.config.sink_tokens,
                # the device window holds between window_tokens and window_tokens + flush_tokens tokens: the
                # daemon's index then never covers a position this cache still attends on the device
                window_tokens=self.config.window_tokens + self.config.flush_tokens, exist_ok=True,
                pinned=self.config.pinned,
                ttl_seconds=self.config.ttl_seconds, index_params=self.config.index_params)
            shape = (int(info.num_layers), int(info.num_kv_heads), int(info.num_query_heads), int(info.head_dim))
            if shape != (self.num_layers, hkv, hq, d):
                raise ValueError(f"session {sid!r} has shape {shape}, the model needs {(self.num_layers, hkv, hq, d)}")
            expected = self.layers[0].submitted if self.layers else 0
            if int(info.num_tokens) != expected:
                raise ValueError(f"session {sid!r} holds {info.num_tokens} tokens, the cache expected {expected}")
            stored = getattr(info, "dtype", None)
            if isinstance(stored, torch.dtype):
                dtype = stored  # a continued session keeps the dtype it was created with
        self.kv_dtype = dtype
        self.is_open = True

    # --- update: place K/V on the device ------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        while len(self.layers) <= layer_idx:
            self.layers.append(KVDLayer(cfg.sink_tokens, cfg.window_tokens, cfg.flush_tokens))
        layer: KVDLayer = self.layers[layer_idx]
        if not layer.consumed:
            raise RuntimeError("KVDCache needs the kvd attention function: call kvd_transformers.enable(model) "
                               "or load the model with attn_implementation='kvd'")
        if self._error is not None:
            raise RuntimeError("a background append to kvd failed") from self._error
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        assert layer.buf_k is not None and layer.buf_v is not None
        n = key_states.shape[2]
        if layer_idx == 0:
            self._capture_ids(layer.total, key_states.shape[0], n)
        if n == 1 and layer.hint_q is not None:  # first decode step: the prefill's index hints go out
            self._finish_prefill(layer_idx, layer)
        rerun = self._retro_rows()
        if (n == 1 and not layer.keep_all) or (rerun and n == rerun + 1):
            # a decode step (with retro: the new token after the re-run cached positions, which the cache was
            # rewound by, so their recomputed K/V overwrite the stale ones)
            if layer.used + n > layer.buf_k.shape[2]:
                self._evict(layer_idx, layer, cfg.flush_tokens)
            slot = layer.used
            layer.buf_k[:, :, slot:slot + n].copy_(key_states)
            layer.buf_v[:, :, slot:slot + n].copy_(value_states)
            layer.pending_new = 0
        else:
            if n == 1:  # first decode step after an exact multi-forward prefill: drop to sink + window first
                self._trim(layer_idx, layer)
            layer.ensure_capacity(layer.used + n)
            layer.buf_k[:, :, layer.used:layer.used + n].copy_(key_states)
            layer.buf_v[:, :, layer.used:layer.used + n].copy_(value_states)
            layer.pending_new = n if n > 1 else 0
        layer.used += n
        layer.total += n
        keys = layer.buf_k[:, :, :layer.used]
        values = layer.buf_v[:, :, :layer.used]
        layer.keys, layer.values = keys, values
        layer.consumed = False
        _last_update.token = _UpdateToken(self, layer_idx, keys)
        return keys, values

    def _capture_ids(self, start: int, batch: int, n: int) -> None:
        ids = getattr(_forward_inputs, "ids", None)
        _forward_inputs.ids = None
        if not self._ids_ok:
            return
        if ids is None or ids.dim() != 2 or tuple(ids.shape) != (batch, n) or ids.is_floating_point():
            self._ids_ok = False  # unknown ids (inputs_embeds, no hook): stop recording for these sessions
            self._ids.clear()
            return
        self._ids.append((start, ids.detach()))

    def _ids_for(self, start: int, end: int) -> torch.Tensor | None:
        """Token ids [B, end - start] of positions [start, end) if recorded; drops what lies before `end`."""
        if not self._ids_ok or not self._ids or self._ids[0][0] > start:
            return None
        parts = []
        for pos, ids in self._ids:
            lo, hi = max(start, pos), min(end, pos + ids.shape[1])
            if hi > lo:
                parts.append(ids[:, lo - pos:hi - pos])
        got = torch.cat(parts, dim=1) if parts else None
        self._ids = [(pos, ids) for pos, ids in self._ids if pos + ids.shape[1] > end]
        if got is None or got.shape[1] != end - start:
            return None
        return got.to("cpu", non_blocking=False)

    def history(self, row: int = 0) -> torch.Tensor | None:
        """Token ids stored in kvd for this cache's session (row `row`), or None if none were stored."""
        if not self.session_ids:
            return None
        self.flush()
        res = self.client.fetch(self.session_ids[row], 0, self.get_seq_length(), layers=[0], with_token_ids=True)
        ids = getattr(res, "token_ids", None)
        return None if ids is None else torch.as_tensor(ids)

    def check_history(self, input_ids: torch.Tensor) -> None:
        """Raise if the token ids stored with the continued sessions are not a prefix of `input_ids` ([B, T]):
        continuing a session with a different history would silently attend to the wrong tokens."""
        n = self.get_seq_length()
        if n == 0 or not self.session_ids:
            return
        if input_ids.shape[1] < n:
            raise ValueError(f"the sessions hold {n} tokens but the input has only {input_ids.shape[1]}")
        for row, sid in enumerate(self.session_ids):
            res = self.client.fetch(sid, 0, n, layers=[0], with_token_ids=True)
            stored = getattr(res, "token_ids", None)
            if stored is None or len(stored) < n:
                continue  # the session has no (complete) token ids: nothing to check against
            if not torch.equal(torch.as_tensor(stored)[:n].cpu(), input_ids[row, :n].cpu().long()):
                raise ValueError(f"session {sid!r} holds a different history than input_ids[{row}, :{n}]")

    def _evict(self, layer_idx: int, layer: KVDLayer, count: int) -> None:
        """Drop the `count` oldest window tokens (they must be in kvd first)."""
        s = layer.sink_len
        self._ensure_submitted(layer_idx, layer, layer.total - layer.win_len + count)
        if layer.copy_event is not None:  # the slots about to be overwritten may still be copying out
            torch.cuda.current_stream(layer.buf_k.device).wait_event(layer.copy_event)  # type: ignore[union-attr]
        assert layer.buf_k is not None and layer.buf_v is not None
        keep = layer.used - s - count
        layer.buf_k[:, :, s:s + keep] = layer.buf_k[:, :, s + count:layer.used].clone()
        layer.buf_v[:, :, s:s + keep] = layer.buf_v[:, :, s + count:layer.used].clone()
        layer.used -= count

    def _trim(self, layer_idx: int, layer: KVDLayer) -> None:
        """Back to `[sink | last window_tokens]` (and a buffer of the decode capacity)."""
        layer.keep_all = False
        s = layer.sink_len
        w = min(layer.win_len, self.config.window_tokens)
        cap = self.config.sink_tokens + self.config.window_tokens + self.config.flush_tokens
        assert layer.buf_k is not None and layer.buf_v is not None
        if layer.win_len == w and layer.buf_k.shape[2] == cap:
            return
        self._ensure_submitted(layer_idx, layer, layer.total - w)
        b, h, _, d = layer.buf_k.shape
        nk = layer.buf_k.new_empty(b, h, cap, d)
        nv = layer.buf_v.new_empty(b, h, cap, d)
        nk[:, :, :s].copy_(layer.buf_k[:, :, :s])
        nv[:, :, :s].copy_(layer.buf_v[:, :, :s])
        nk[:, :, s:s + w].copy_(layer.buf_k[:, :, layer.used - w:layer.used])
        nv[:, :, s:s + w].copy_(layer.buf_v[:, :, layer.used - w:layer.used])
        layer.buf_k, layer.buf_v = nk, nv
        layer.used = s + w
        layer.keys, layer.values = nk[:, :, :layer.used], nv[:, :, :layer.used]

    # --- appends ---------------------------------------------------------------------------------------------
    def _ensure_submitted(self, layer_idx: int, layer: KVDLayer, end: int) -> None:
        """Tokens [0, end) of this layer are on their way to kvd (their host copy is queued on the stream
        before any later device write, so their slots may be reused)."""
        if layer.submitted < end:
            self._submit_layers([layer_idx])

    def _ensure_appended(self, layer_idx: int, layer: KVDLayer, end: int) -> None:
        """Block until kvd holds tokens [0, end) of this layer."""
        if layer.confirmed >= end:
            return
        if layer.submitted < end:
            self._submit_layers([layer_idx])
        while layer.confirmed < end and layer.jobs:
            job = layer.jobs.popleft()
            job.future.result()
            layer.confirmed = max(layer.confirmed, job.end)
        if layer.confirmed < end:
            raise RuntimeError(f"layer {layer_idx}: kvd holds {layer.confirmed} tokens, {end} needed")

    def _await_kvd(self, layer_idx: int, layer: KVDLayer, end: int) -> None:
        """Before a Retrieve of this layer: block until kvd holds tokens [0, end) and, after a prefill, the
        append that carries the layer's index hints. A Retrieve reaching the daemon before the hints would
        start the layer's index build without them (keys as stand-in queries: not attention-aware)."""
        needed = max(end, layer.hints_until)
        layer.hints_until = 0
        if layer.confirmed < needed:
            self._ensure_appended(layer_idx, layer, needed)

    def _submit_layers(self, layer_ids: list[int], hints: dict[int, tuple[torch.Tensor, torch.Tensor | None]]
                       | None = None, upto: int | None = None) -> None:
        """Hand the not-yet-submitted tokens [submitted, upto or total) of these layers (all with the same
        range) to the appender; hints ride on the last piece."""
        if not layer_ids or not self.is_open:
            return
        first = self.layers[layer_ids[0]]
        start, end = first.submitted, first.total if upto is None else upto
        if end <= start:
            return
        ks, vs = [], []
        for i in layer_ids:
            lay = self.layers[i]
            if lay.submitted != start or lay.total < end:
                raise RuntimeError("layers submitted together must hold the same token range")
            a, _ = lay.pending_slots()
            assert lay.buf_k is not None and lay.buf_v is not None
            ks.append(lay.buf_k[:, :, a:a + end - start])
            vs.append(lay.buf_v[:, :, a:a + end - start])
        host_k, host_v, event = _to_host(ks, vs, self.kv_dtype, self._copy_stream(ks[0].device))
        for i in layer_ids:
            self.layers[i].copy_event = event
        host_hints: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for i, (hq, ht) in (hints or {}).items():
            host_hints[i] = (hq.float().cpu(), None if ht is None else ht.cpu())
        sids = list(self.session_ids or [])
        chunk = self.config.append_chunk_tokens
        client = self.client
        token_ids = self._ids_for(start, end) if 0 in layer_ids else None

        def job() -> None:
            if event is not None:
                event.synchronize()
            for row, sid in enumerate(sids):
                for a in range(start, end, chunk):
                    b = min(end, a + chunk)
                    last = b == end
                    hq_t = ht_t = None
                    if last and host_hints:
                        hq_t = torch.stack([host_hints[i][0][row] for i in layer_ids])
                        tops = [host_hints[i][1] for i in layer_ids]
                        if all(t is not None for t in tops):
                            ht_t = torch.stack([t[row] for t in tops])  # type: ignore[index]
                    kwargs: dict[str, Any] = {}
                    if token_ids is not None:
                        kwargs["token_ids"] = token_ids[row, a - start:b - start]
                    if hq_t is not None:
                        kwargs["hint_queries"] = hq_t
                        if ht_t is not None:
                            kwargs["hint_topn"] = ht_t
                    try:
                        client.append(sid, a, host_k[:, row, :, a - start:b - start],
                                      host_v[:, row, :, a - start:b - start], layers=list(layer_ids), **kwargs)
                    except Exception as exc:
                        if "token_ids" not in kwargs or "token ids" not in str(exc):
                            raise
                        # the session's stored ids do not line up (e.g. filled without ids): go on without
                        self._ids_ok = False
                        del kwargs["token_ids"]
                        client.append(sid, a, host_k[:, row, :, a - start:b - start],
                                      host_v[:, row, :, a - start:b - start], layers=list(layer_ids), **kwargs)

        self.stats.appends += 1
        future = self._run_append(job)
        for i in layer_ids:
            lay = self.layers[i]
            lay.submitted = end
            lay.jobs.append(Job(end, future))

    def _copy_stream(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _run_append(self, job: Callable[[], None]) -> Future[None]:
        if self._appender is None:
            fut: Future[None] = Future()
            job()
            fut.set_result(None)
            return fut
        fut = self._appender.submit(job)
        fut.add_done_callback(self._note_error)
        return fut

    def _note_error(self, fut: Future[None]) -> None:
        exc = fut.exception()
        if exc is not None and self._error is None:
            self._error = exc

    def flush(self) -> None:
        """Append every token seen so far to kvd and wait until kvd holds them."""
        if not self.is_open:
            return
        for i, lay in enumerate(self.layers):
            self._finish_prefill(i, lay)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, lay in enumerate(self.layers):
            if lay.total > lay.submitted:
                groups.setdefault((lay.submitted, lay.total), []).append(i)
        for ids in groups.values():
            self._submit_layers(ids)
        for i, lay in enumerate(self.layers):
            self._ensure_appended(i, lay, lay.total)
        if self._error is not None:
            raise RuntimeError("a background append to kvd failed") from self._error

    def persist(self, seal: bool = False) -> None:
        """flush() and make the sessions durable in kvd."""
        self.flush()
        for sid in self.session_ids or []:
            self.client.persist(sid, seal=seal)

    def close(self) -> None:
        """flush() and stop the worker threads (the sessions stay in kvd)."""
        try:
            self.flush()
        finally:
            if self.lookahead is not None:
                self.lookahead.close()
            self._close_plans()
            self._finalizer()

    def __enter__(self) -> KVDCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- attention (called by kvd_transformers.attention) ---------------------------------------------------
    def attend(self, module: torch.nn.Module, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
        """Attention of `query` ([B, Hq, n, D]) over the whole sequence: the device-resident part exactly,
        the offloaded part through kvd. Returns [B, Hq, n, D] in the query dtype."""
        if not self.is_open:
            self._open(module, query, key)
        layer: KVDLayer = self.layers[layer_idx]
        layer.consumed = True
        n = query.shape[2]
        retro_step = self.retro is not None and layer.pending_new == 0 and n == (self.retro.rows or 0) + 1
        decode = n == 1 and layer.pending_new == 0
        if not (retro_step or decode):
            self._finish_ahead()  # (decode steps read the previous launch-ahead reply later, after their launches)
        if self.lookahead is not None and not decode:
            self.lookahead.drop(layer_idx)
        if retro_step or decode:
            if retro_step:
                out = self._attend_retro(layer_idx, layer, query, key, value, mask, scale)
            else:
                out = self._attend_decode(layer_idx, layer, query, key, value, mask, scale)
            if layer_idx == self.num_layers - 1:
                self._finish_ahead()  # a failed run stops this forward, before its logits are used
                self._decode_forwards += 1
                self._maybe_flush_decode()
            return out
        return self._attend_multi(module, layer_idx, layer, query, key, value, mask, scale)

    def _ranges(self, end: int, mask: Any, repeat: int = 1) -> list[tuple[int, int]]:
        """Per-sequence offloaded ranges (left-padded rows start after their padding)."""
        begins = getattr(mask, "first_valid", None)
        s = self.config.sink_tokens
        key = (end, repeat, *(begins or ()))
        got = self._ranges_cache.get(key)
        if got is None:
            if begins is None:
                got = [(s, end)] * (self.batch * repeat)
            else:
                got = [(min(max(s, b), end), end) for b in begins for _ in range(repeat)]
            if len(self._ranges_cache) > 64:
                self._ranges_cache.clear()
            self._ranges_cache[key] = got
        return got

    def _start_retrieve(self, layer_idx: int, q_host: torch.Tensor, event: Any, ranges: list[tuple[int, int]],
                        sids: list[str], scale: float, write_past: Callable[[Any], None] | None = None,
                        **extra: Any) -> Callable[[], Any]:
        """Start the Retrieve call (in the worker thread with overlap=True); returns a waiter for its result.
        `extra`: retro's past-query arguments (its past queries stacked before the new one in q_host
        [B, P + 1, Hq, D]; `write_past` writes its seen ids and bounds into a prepared plan instead) or
        lookahead's candidates."""
        cfg = self.config
        client = self.client
        log = self.retrieve_log
        exact = cfg.exact
        stats = self.stats
        plan = None
        keep = log is not None or self.retro is not None
        if not extra:
            plan = self._decode_plan(sids, scale)
        elif (past := extra.get("past_in_queries")) and write_past is not None:
            plan = self._decode_plan(sids, scale, past, extra["past_seen_ids"].shape[-1])

        def call() -> Any:
            started = time.perf_counter()
            if event is not None:
                event.synchronize()
            synced = time.perf_counter()
            if plan is not None:
                res = _run_plan(plan, layer_idx, q_host, ranges, write_past if extra else None, keep)
            else:
                res = client.retrieve(sids, layer_idx, q_host, k=cfg.top_k, mode="attention", ranges=ranges,
                                      scale=scale, exact=exact, search_params=cfg.search_params, **extra)
            stats.query_sync_s += synced - started
            stats.retrieve_rpc_s += time.perf_counter() - synced
            self._note_result(res)
            if log is not None:
                log.append((layer_idx, res))
            return res

        self.stats.retrieve_calls += 1
        if self._retriever is None:
            result = call()
            return lambda: result
        return self._retriever.submit(call).result

    def _decode_plan(self, sids: list[str], scale: float, past: int = 0, seen: int = 0) -> Any:
        """The prepared plan of these decode Retrieves (made on first use; one per set of sessions, scale, search
        params and, with RetroAttention, past-query count and seen width); None with config.prepared off or a
        client that cannot prepare."""
        cfg = self.config
        prepare = getattr(self.client, "prepare_retrieve", None)
        if not cfg.prepared or prepare is None:
            return None
        params, settings = self._plan_settings()
        key = (tuple(sids), scale, settings, past, seen)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _PLANS_KEPT:
                self._close_plans()
            plan = self._plans[key] = prepare(list(sids), k=cfg.top_k, scale=scale, exact=cfg.exact,
                                              search_params=params or None, past=past, seen=seen)
        return plan

    def _plan_settings(self) -> tuple[dict[str, str], tuple[Any, ...]]:
        """The plans' search params (launch-ahead's thread count added) and the settings that tell plans apart,
        made again only when the config or its search params change (it runs at every decode layer)."""
        cfg, memo = self.config, self._settings_memo
        if memo is not None and memo[0] is cfg and memo[1] == cfg.search_params and memo[2] == self._ahead_device:
            return memo[3], memo[4]
        params = dict(cfg.search_params or {})
        if cfg.launch_ahead and self._ahead_device and "threads" not in params:
            params["threads"] = str(ahead_threads())
        settings = (cfg.top_k, cfg.exact, tuple(sorted(params.items())))
        given = None if cfg.search_params is None else dict(cfg.search_params)  # a copy: changes in place count
        self._settings_memo = (cfg, given, self._ahead_device, params, settings)
        return params, settings

    def _close_plans(self) -> None:
        self._finish_ahead()
        plans, self._plans = list(self._plans.values()), {}
        if self._registered:
            registered = list(self._registered.values())
            self._registered.clear()
            registered[0].waiter.synchronize()  # no copy may still read a region unregistered and unmapped next
            for each in registered:
                each.unregister()
        for plan in plans:
            plan.close()

    def _attend_decode(self, layer_idx: int, layer: KVDLayer, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
        t0 = time.perf_counter()
        stats = self.stats
        stats.decode_calls += 1
        end = layer.offloaded_end()
        valid = resident_valid(mask, layer) if mask is not None else None
        if end <= self.config.sink_tokens:  # nothing offloaded yet: the device holds the whole sequence
            self._finish_ahead()
            out_w, _ = ops.window_attention(query, key, value, scale, mask=valid)
            stats.decode_s += time.perf_counter() - t0
            return out_w.to(query.dtype)
        self._await_kvd(layer_idx, layer, end)
        chosen = {}
        if self.lookahead is not None and (candidates := self.lookahead.take(layer_idx, end)) is not None:
            chosen["candidates"] = candidates
        ranges = self._ranges(end, mask)
        sids = self.session_ids or []
        if not chosen and (registered := self._ahead_plan(query, sids, scale)) is not None:
            out = self._attend_ahead(layer_idx, registered, query, key, value, valid, ranges, scale)
            stats.decode_s += time.perf_counter() - t0
            return out
        self._finish_ahead()
        q_host, event = layer.stage_query(query)
        if self._retriever is not None:
            wait = self._start_retrieve(layer_idx, q_host, event, ranges, sids, scale, **chosen)
            out_w, lse_w = ops.window_attention(query, key, value, scale, mask=valid)
        else:
            out_w, lse_w = ops.window_attention(query, key, value, scale, mask=valid)
            wait = self._start_retrieve(layer_idx, q_host, event, ranges, sids, scale, **chosen)
        t1 = time.perf_counter()
        res = wait()
        stats.retrieve_wait_s += time.perf_counter() - t1
        both = layer.stage_result(res.output, res.lse).to(query.device, non_blocking=True)  # one H2D copy
        d = query.shape[-1]
        out = ops.merge_into_window(out_w, lse_w, both[..., :d].unsqueeze(2), both[..., d].unsqueeze(2))
        out = out.to(query.dtype)
        stats.decode_s += time.perf_counter() - t0
        return out

    def _ahead_plan(self, query: torch.Tensor, sids: list[str], scale: float, past: int = 0, seen: int = 0
                    ) -> RegisteredPlan | None:
        """The registered plan of a launch-ahead decode Retrieve, or None where this call takes the blocking path
        (config.launch_ahead off, not CUDA, the first decode forward, overlap, a debug log, no plan or fast lane)."""
        if not (self.config.launch_ahead and self._ahead_device and self._decode_forwards and self._retriever is None
                and self.retrieve_log is None) or (waiter := self._waiter(query.device)) is None:
            return None
        plan = self._decode_plan(sids, scale, past, seen)
        if plan is None:
            return None
        registered = self._registered.get(id(plan))
        if registered is not None and registered.plan is plan:  # registered: prepared, with a region, until closed
            return registered
        if plan.slots() is None or plan.signal_word() is None:
            return None
        try:
            registered = self._registered[id(plan)] = RegisteredPlan(plan, waiter)
        except RuntimeError as exc:  # e.g. the driver refused to page-lock the region
            self._give_up_ahead(exc)
            return None
        return registered

    def _give_up_ahead(self, exc: BaseException) -> None:
        """Launch-ahead failed on this device: this cache decodes on the blocking path from now on."""
        self._ahead_device = False
        warnings.warn(f"kvd launch-ahead is off for this cache: {exc}", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _waiter(device: torch.device) -> StreamWaiter | None:
        """The device's launch-ahead primitives (kvd_transformers.launch_ahead); None: the blocking path."""
        return stream_waiter() if device.type == "cuda" else None

    def _attend_ahead(self, layer_idx: int, registered: RegisteredPlan, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, valid: Any, ranges: list[tuple[int, int]], scale: float) -> torch.Tensor:
        """Decode attention with launch-ahead (kvd_transformers.launch_ahead): the query is copied into the plan's
        region, the window attention launched, the run sent, and the device told to wait for its results, which it
        then copies and merges; returns without waiting for kvd."""
        plan = registered.plan
        self._copy_query(registered, plan.queries, query[:, :, 0].to(torch.float32))
        out_w, lse_w = ops.window_attention(query, key, value, scale, mask=valid)
        res = self._start_ahead(layer_idx, registered, ranges, query.device)
        if res is not None:  # no fast lane at the moment: it was a blocking run
            output, lse = res.output, res.lse
        else:
            self._ahead_started = (plan, None)
            slots = plan.slots()
            output, lse = slots["output"], slots["lse"]
        out_r = output.to(query.device, non_blocking=True).unsqueeze(2)
        lse_r = lse.to(query.device, non_blocking=True).unsqueeze(2)
        return ops.merge_into_window(out_w, lse_w, out_r, lse_r).to(query.dtype)

    def _copy_query(self, registered: RegisteredPlan, into: torch.Tensor, queries: torch.Tensor) -> None:
        """The queries (float32 on the device, in the shape of `into`, a plan input) copied into the plan on the
        stream; the event marks their arrival."""
        into.copy_(queries, non_blocking=True)
        if self._ahead_event is None:
            self._ahead_event = registered.waiter.event()
        self._ahead_event.record()

    def _start_ahead(self, layer_idx: int, registered: RegisteredPlan, ranges: list[tuple[int, int]],
                     device: torch.device, write_inputs: Callable[[], None] | None = None) -> Any:
        """Read the previous layer's reply (after this layer's launches, which it overlapped), write the plan's
        host-side inputs (`write_inputs`: the previous run has read them by now), wait for the query's copy and
        send the run, the stream told to wait for its results. Returns None, or the result of a blocking run where
        the run could not be split (no fast lane at the moment)."""
        stats, plan = self.stats, registered.plan
        self._finish_ahead()
        if write_inputs is not None:
            write_inputs()
        finished = time.perf_counter()
        self._ahead_event.synchronize()  # the query is in the region (and the previous run's results were read)
        synced = time.perf_counter()
        stats.query_sync_s += synced - finished
        stats.retrieve_calls += 1
        signal = plan.start(layer_idx, ranges)
        if signal is None:
            res = plan.run(layer_idx, ranges)
            self._note_result(res)
            stats.retrieve_rpc_s += time.perf_counter() - synced
            return res
        try:
            registered.wait(registered.waiter.stream(device), signal)
        except RuntimeError as exc:  # the stream cannot wait: this thread does, for this run and the next ones
            self._give_up_ahead(exc)
            res = plan.finish()
            self._note_result(res)
            stats.retrieve_rpc_s += time.perf_counter() - synced
            return res
        stats.retrieve_rpc_s += time.perf_counter() - synced
        stats.ahead_runs += 1
        return None

    def _finish_ahead(self) -> None:
        """Read the reply of the launch-ahead run the device waits on (errors raise here)."""
        if self._ahead_started is None:
            return
        (plan, after), self._ahead_started = self._ahead_started, None
        waited = time.perf_counter()
        try:
            res = plan.finish()
        except BaseException:
            if self.retro is not None:  # the device's merge read whatever the slots held: the corrected rows are lost
                self.retro.reset()
            raise
        done = time.perf_counter()
        self.stats.retrieve_wait_s += done - waited
        self.stats.retrieve_rpc_s += done - waited
        self._note_result(res)
        if after is not None:
            after(res)

    def _note_result(self, res: Any) -> None:
        """A Retrieve's timings into the stats (a stand-in client's result may have none)."""
        stats = self.stats
        stats.retrieve_server_s += getattr(res, "server_ms", 0.0) / 1000
        stats.retrieve_search_s += getattr(res, "search_ms", 0.0) / 1000
        stats.retrieve_attend_s += getattr(res, "attend_ms", 0.0) / 1000
        stats.retrieve_search_kernel_s += getattr(res, "search_kernel_ms", 0.0) / 1000
        stats.retrieve_attend_kernel_s += getattr(res, "attend_kernel_ms", 0.0) / 1000

    def set_overlap(self, on: bool) -> None:
        """Turn the Retrieve worker thread (config.overlap) on or off between forwards. Off, the calling thread
        launches the window attention first and then makes the call itself: the device still computes the window
        meanwhile, and the call skips two thread hand-offs."""
        if on and self._retriever is None:
            self._retriever = ThreadPoolExecutor(1, thread_name_prefix="kvd-retrieve")
            weakref.finalize(self, _shutdown, self._retriever)
        elif not on and self._retriever is not None:
            self._retriever.shutdown(wait=True)
            self._retriever = None
        self.config = replace(self.config, overlap=on)

    def set_lookahead(self, candidates: int | None) -> None:
        """Turn lookahead on (with this many candidates per query head) or off (None) between forwards."""
        if self.lookahead is not None:
            self.lookahead.close()
            self.lookahead = None
        self.config = replace(self.config, lookahead=candidates is not None,
                              lookahead_candidates=candidates or self.config.lookahead_candidates)
        self.config.validate()
        if candidates is not None:
            self.lookahead = LookaheadState(self.client, candidates, self.stats, self.config.lookahead_params)

    def wants_lookahead(self, layer_idx: int) -> bool:
        """Whether a lookahead search for layer `layer_idx` can start now (before this decode step reaches it):
        the layer takes the decode path and everything it would search is in kvd already."""
        if not self.is_open or self.config.exact or layer_idx >= len(self.layers):
            return False
        layer = self.layers[layer_idx]
        if not layer.is_initialized or layer.pending_new or layer.keep_all:
            return False
        end = layer.offloaded_end()
        return end > self.config.sink_tokens and layer.confirmed >= end

    def start_lookahead(self, layer_idx: int, query: torch.Tensor, mask: Any) -> None:
        """Start the search of layer `layer_idx` with an approximate query [B, Hq, 1, D] (lookahead hook)."""
        assert self.lookahead is not None
        end = self.layers[layer_idx].offloaded_end()
        self.lookahead.start(layer_idx, query, self.session_ids or [], self._ranges(end, mask), end)

    def _maybe_flush_decode(self) -> None:
        """Every flush_tokens decode steps, one append of all layers (minus the hold_tokens newest tokens)."""
        first = self.layers[0]
        hold, flush = self.config.hold_tokens, self.config.flush_tokens
        if first.total - hold - first.submitted >= flush:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, lay in enumerate(self.layers):
                if lay.total - hold - lay.submitted >= flush:
                    groups.setdefault((lay.submitted, lay.total), []).append(i)
            for (_, total), ids in groups.items():
                self._submit_layers(ids, upto=total - hold)

    # --- RetroAttention (kvd_transformers.retro) -----------------------------------------------------------
    def begin_retro_step(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Called by the retro pre-hook before every forward. For a one-token decode input, rewinds the cache by
        the P cached positions that are still held back from kvd and returns their token ids [B, P] (None when
        there is nothing to re-run); any other input ends the corrections of the cached positions."""
        retro = self.retro
        if retro is None:
            return None
        retro.rows = 0
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1 or input_ids.is_floating_point():
            retro.reset()
            return None
        held = min((lay.total - lay.submitted for lay in self.layers), default=0)
        count = min(retro.cached(), held) if self.is_open else 0
        retro.keep_newest(count)
        ids = input_ids if count == 0 or retro.ids is None else torch.cat([retro.ids, input_ids], dim=1)
        retro.ids = ids[:, -retro.capacity:]
        if count == 0:
            return None
        for lay in self.layers:
            lay.used -= count
            lay.total -= count
        keep = self.layers[0].total
        self._ids = [(pos, got[:, :keep - pos]) for pos, got in self._ids if pos < keep]
        retro.rows = count
        retro.rerun_rows += count
        return ids[:, :count]

    def end_retro_step(self) -> int:
        """Called by the retro post-hook: the number of re-run rows of the forward that just ended."""
        if self.retro is None:
            return 0
        rows, self.retro.rows = self.retro.rows or 0, None
        return rows

    def _retro_rows(self) -> int | None:
        if self.retro is None:
            return None
        if self.retro.rows is None:
            raise RuntimeError("KVDCache(retro=True) needs the hooks that kvd_transformers.enable(model) installs "
                               "on the model that is called")
        return self.retro.rows

    def _attend_retro(self, layer_idx: int, layer: KVDLayer, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
        """A decode step with RetroAttention: query [B, Hq, 1 + P, D] holds the P re-run cached positions, then
        the new token. The new token attends as in `_attend_decode`; in the same Retrieve call the P cached
        queries attend the newly retrieved keys they had not seen, and their cached outputs (corrected by the
        log-sum-exp merge) are the outputs of the re-run rows."""
        t0 = time.perf_counter()
        self.stats.decode_calls += 1
        assert self.retro is not None
        cache = self.retro.layer(layer_idx)
        count = query.shape[2] - 1
        if len(cache) != count:
            raise RuntimeError(f"layer {layer_idx}: the retro output cache holds {len(cache)} steps, {count} re-run")
        q_new = query[:, :, -1:]
        end = layer.offloaded_end()
        valid = resident_valid(mask, layer) if mask is not None else None
        if end <= self.config.sink_tokens:  # nothing offloaded: the device holds the whole sequence
            self._finish_ahead()
            views = cache.begin(q_new)
            out, _ = cache.put_window(views, *ops.window_attention(q_new, key, value, scale, mask=valid, rows=True))
            cache.commit(np.empty((q_new.shape[0], 1, q_new.shape[1], 0), dtype=np.int64), end)
        else:
            self._await_kvd(layer_idx, layer, end)
            ranges = self._ranges(end, mask)
            sids = self.session_ids or []
            registered = self._ahead_plan(q_new, sids, scale, count, cache.seen_width() if count else 0)
            if registered is not None:
                out = self._attend_retro_ahead(layer_idx, registered, cache, q_new, key, value, valid, ranges, scale,
                                               end)
            else:
                out = self._attend_retro_blocking(layer_idx, layer, cache, q_new, key, value, valid, ranges, scale,
                                                  end)
        self.stats.decode_s += time.perf_counter() - t0
        return out.transpose(1, 2).to(query.dtype, copy=True)  # out: rows of the layer's buffers, rewritten later

    def _attend_retro_blocking(self, layer_idx: int, layer: KVDLayer, cache: RetroLayer, q_new: torch.Tensor,
                               key: torch.Tensor, value: torch.Tensor, valid: Any, ranges: list[tuple[int, int]],
                               scale: float, end: int) -> torch.Tensor:
        """A retro step's attention with the Retrieve made by this thread (or the overlap worker): the window part
        computed while kvd works, then one merge of all rows and the commit (RetroState.finish). Returns float32
        [B, P + 1, Hq, D]."""
        assert self.retro is not None
        retro, count = self.retro, len(cache)
        self._finish_ahead()
        views = cache.begin(q_new)
        q_host, event = layer.query_stage.put(views.queries if count else views.first)
        past, write = {}, None
        if count:
            past = cache.request(retro.bounds, end)
            write = partial(retro.write_past, cache, end)
        sids = self.session_ids or []
        if self._retriever is not None:
            wait = self._start_retrieve(layer_idx, q_host, event, ranges, sids, scale, write, **past)
            window = ops.window_attention(q_new, key, value, scale, mask=valid, rows=True)
        else:
            window = ops.window_attention(q_new, key, value, scale, mask=valid, rows=True)
            wait = self._start_retrieve(layer_idx, q_host, event, ranges, sids, scale, write, **past)
        base = cache.put_window(views, *window)  # while kvd works
        t1 = time.perf_counter()
        res = wait()
        self.stats.retrieve_wait_s += time.perf_counter() - t1
        return retro.finish(cache, res, base, end, q_new.device)

    def _attend_retro_ahead(self, layer_idx: int, registered: RegisteredPlan, cache: RetroLayer,
                            q_new: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: Any,
                            ranges: list[tuple[int, int]], scale: float, end: int) -> torch.Tensor:
        """A retro step's attention with launch-ahead: as `_attend_decode`'s, with all queries (the cached ones,
        then the new token's) copied into the plan on the stream, and the seen ids and bounds written once the
        previous run read its own; the merge of all rows is queued on the device, and the host's part of the step
        (the retrieved ids as seen, the commit) is done when the reply is read (RetroState.record). Returns
        float32 [B, P + 1, Hq, D]."""
        assert self.retro is not None
        retro, plan, count, device = self.retro, registered.plan, len(cache), q_new.device
        views = cache.begin(q_new)
        inputs = retro.past_inputs(plan) if count else None
        if inputs is not None:
            self._copy_query(registered, inputs.queries, views.queries)
        else:
            self._copy_query(registered, plan.queries, views.first)
        base = cache.put_window(views, *ops.window_attention(q_new, key, value, scale, mask=valid, rows=True))
        write = None if inputs is None else partial(inputs.write, cache, retro.bounds, end)
        res = self._start_ahead(layer_idx, registered, ranges, device, write)
        if res is not None:  # a blocking run: its results may be views that the next run rewrites
            kept = {name: t.clone() for name in ("ids", "packed", "output", "lse")
                    if (t := getattr(res, name, None)) is not None}
            return retro.finish(cache, replace(res, **kept), base, end, device)
        if inputs is not None:
            assert inputs.ids is not None and inputs.past_lse is not None
            ids, past_lse = inputs.ids, inputs.past_lse
            out, _ = retro.merge(*inputs.reply_on(device), base)

            def record(reply: Any) -> None:  # the slots hold the reply until the next run: ids copied, lse counted
                retro.record(cache, ids.copy(), past_lse, end)
        else:
            slots = plan.slots()
            out_r = slots["output"].to(device, non_blocking=True).unsqueeze(1)
            lse_r = slots["lse"].to(device, non_blocking=True)[:, None, :, None]
            out, _ = retro.merge(out_r, lse_r, base)

            def record(reply: Any) -> None:
                retro.record(cache, reply.ids.numpy()[:, None].copy(), None, end)

        self._ahead_started = (plan, record)
        return out

    def _attend_multi(self, module: torch.nn.Module, layer_idx: int, layer: KVDLayer, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
        """A multi-token forward (prefill, or a new turn's prompt): exact over the resident keys plus the new
        tokens (causal), kvd retrieval for the offloaded part, then stream the new K/V to kvd."""
        cfg = self.config
        n = query.shape[2]
        total_before = layer.total - n
        all_resident = layer.used == layer.total  # nothing was ever dropped from the device
        end = total_before - (layer.win_len - n) if not all_resident else 0
        padding = resident_padding(mask, layer)  # [B, used] bool or None
        if end <= cfg.sink_tokens:
            out = ops.causal_attention(query, key, value, scale, padding=padding, q_chunk=cfg.q_chunk)
        else:
            self._await_kvd(layer_idx, layer, end)
            out_d, lse_d = _chunked_attend_lse(query, key, value, scale, padding, cfg.q_chunk)
            out_r, lse_r = self._retrieve_many(layer_idx, query, end, mask, scale)
            out, _ = ops.merge_lse(out_d, lse_d, out_r, lse_r)
            out = out.to(query.dtype)
        # stream this layer's new tokens to kvd. A sample of the queries accumulates for the index hints;
        # they ride on the last token, held back until the prefill ends (first decode step or flush), with
        # their exact top-N over all keys when every key is still on the device (exact prefill).
        layer.pending_new = 0
        if cfg.hint_samples > 0 and n > 1:
            self._sample_hint_queries(layer, query)
        self._submit_layers([layer_idx], upto=layer.total - (1 if layer.hint_q is not None else 0))
        if cfg.exact_prefill and all_resident:
            layer.keep_all = True  # exact multi-forward prefill: all K/V stay until the first decode step
        else:
            self._trim(layer_idx, layer)
        return out

    def _retrieve_many(self, layer_idx: int, query: torch.Tensor, end: int, mask: Any, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval for n > 1 queries per row: each query is a 'sequence' of the Retrieve call."""
        b, hq, n, d = query.shape
        sids = [sid for sid in (self.session_ids or []) for _ in range(n)]
        ranges = self._ranges(end, mask, repeat=n)
        q = query.permute(0, 2, 1, 3).reshape(b * n, hq, d)
        outs, lses = [], []
        step = self.config.retrieve_chunk
        for a in range(0, b * n, step):
            z = min(b * n, a + step)
            q_host, event = q[a:z].float().cpu(), None
            res = self._start_retrieve(layer_idx, q_host, event, ranges[a:z], sids[a:z], scale)()
            outs.append(res.output)
            lses.append(res.lse)
        out = torch.cat(outs).to(query.device).view(b, n, hq, d).permute(0, 2, 1, 3)
        lse = torch.cat(lses).to(query.device).view(b, n, hq).permute(0, 2, 1)
        return out, lse

    def _sample_hint_queries(self, layer: KVDLayer, query: torch.Tensor) -> None:
        """Keep an evenly spread sample of the prefill queries (at most 2 x hint_samples per layer)."""
        cap = self.config.hint_samples
        sample = query[:, :, _even_positions(query.shape[2], cap, query.device)]
        got = sample if layer.hint_q is None else torch.cat([layer.hint_q, sample], dim=2)
        if got.shape[2] > 2 * cap:
            got = got[:, :, ::2]
        layer.hint_q = got

    def _finish_prefill(self, layer_idx: int, layer: KVDLayer) -> None:
        """End of an exact prefill: the sampled queries' exact top-N over all keys [sink, total) (computed on
        the device while every key is still there) go to kvd with the held-back last token."""
        if layer.hint_q is None:
            return
        cfg = self.config
        sample = layer.hint_q
        layer.hint_q = None
        if sample.shape[2] > cfg.hint_samples:
            sample = sample[:, :, _even_positions(sample.shape[2], cfg.hint_samples, sample.device)]
        topn = None
        assert layer.buf_k is not None
        if cfg.hint_topn > 0 and layer.used == layer.total and layer.total > cfg.sink_tokens:
            keys = layer.buf_k[:, :, :layer.used]
            topn = torch.stack([ops.exact_topn(sample[row], keys[row], cfg.hint_topn, begin=cfg.sink_tokens)
                                for row in range(sample.shape[0])])
        self._submit_layers([layer_idx], {layer_idx: (sample, topn)})
        layer.hints_until = layer.submitted


# --- helpers ---------------------------------------------------------------------------------------------------
def _shutdown(*pools: ThreadPoolExecutor | None) -> None:
    current = threading.current_thread()
    for pool in pools:
        if pool is not None:
            # The finalizer may run on one of the pool's own threads (the cache's last reference dropped in a
            # task there): that thread cannot wait for itself.
            pool.shutdown(wait=current not in getattr(pool, "_threads", ()))


def _is_not_found(exc: BaseException) -> bool:
    if isinstance(exc, LookupError):
        return True
    code = getattr(exc, "code", None)
    name = getattr(code, "name", None) if code is not None else None
    return type(exc).__name__ == "NotFoundError" or name == "NOT_FOUND"


def _to_host(ks: list[torch.Tensor], vs: list[torch.Tensor], dtype: torch.dtype, stream: Any = None
             ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Stack per-layer K/V slices ([B, Hkv, n, D] each) into host tensors [n_layers, B, Hkv, n, D].

    On CUDA: pinned memory, copied on a side stream (after the work queued so far) so that the copies overlap
    the following layers' compute; the returned event marks completion. Source memory is kept alive for the
    side stream (record_stream); whoever overwrites those slots in place waits for the event first."""
    shape = (len(ks), *ks[0].shape)
    cuda = ks[0].device.type == "cuda"
    hk = torch.empty(shape, dtype=dtype, pin_memory=cuda)
    hv = torch.empty(shape, dtype=dtype, pin_memory=cuda)
    if not cuda:
        for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
            hk[i].copy_(k)
            hv[i].copy_(v)
        return hk, hv, None
    stream.wait_stream(torch.cuda.current_stream(ks[0].device))
    with torch.cuda.stream(stream):
        for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
            k.record_stream(stream)
            v.record_stream(stream)
            hk[i].copy_(k, non_blocking=True)
            hv[i].copy_(v, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return hk, hv, event


def _chunked_attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        padding: torch.Tensor | None, q_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_lse of n new queries over [resident | new] keys, causal on the new part, chunked over queries."""
    b, hq, n, _ = q.shape
    length = k.shape[2]
    prefix = length - n
    chunk = max(1, min(q_chunk, (64 << 20) // max(1, 4 * hq * length * b)))
    outs, lses = [], []
    for a in range(0, n, chunk):
        z = min(n, a + chunk)
        m = None if padding is None else padding[:, None, None, :prefix + z]
        o, lse = ops.attend_lse(q[:, :, a:z], k[:, :, :prefix + z], v[:, :, :prefix + z], scale, mask=m,
                                causal_offset=prefix + a)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _even_positions(n: int, count: int, device: torch.device) -> torch.Tensor:
    """min(count, n) distinct, evenly spread indices of range(n)."""
    count = min(count, n)
    return torch.linspace(0, n - 1, count, device=device).round().long()


__all__ = ["CacheStats", "KVDCache", "KVDConfig", "KVDLayer", "take_update"]
