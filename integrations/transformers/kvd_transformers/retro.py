"""RetroAttention for KVDCache: retrospective correction of the last w-1 decode steps' attention outputs.

Per layer, an output cache keeps, for each of the last P <= w-1 decode positions, the query it had at its own
step, its attention output and log-sum-exp (float32), the positions it has attended through kvd (`seen`) and
its offload bound (`seen_from`: every position >= it was in its device window). Each decode step re-runs those
P positions with the new token (one forward of P + 1 tokens; the cache rewinds its length by P first):

- the new token attends as usual (device window exactly + kvd's top-k over the offloaded part);
- in the same Retrieve call each cached query attends those of the new token's retrieved keys that it has not
  seen (kvd.retro on the daemon); its cached output absorbs them by the log-sum-exp merge, so it stays exactly
  the attention of that query over its window at its step plus the union of all keys retrieved since;
- the corrected outputs are the attention outputs of the re-run rows, so they feed the next layer, and those
  positions' K/V (recomputed from the corrected hidden states) overwrite the stale ones in the device window.
  They reach kvd only once they leave the output cache (KVDConfig.hold_tokens >= w - 1 holds them back).

A re-run row's freshly projected query is not used: the cached query keeps the union exact. Only the new token's
logits are produced; tokens already emitted never change. Memory per layer and batch row, independent of the
generation length: device buffers of 2w + SPARE_ROWS rows of (query + output + lse) in float32 (RetroLayer), and
on the host at most (w-1) x (w-1) x top_k seen ids.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import numpy as np
import torch
from kvd_client.prepared import NO_BOUND

MAX_WINDOW = 8


SPARE_ROWS = 8  # rows of a layer's buffers beyond twice the entries: the cached rows move to the front this seldom


class StepViews(NamedTuple):
    """Views of a layer's buffers for one step with P cached entries (rows [start, start + P + 1))."""

    queries: torch.Tensor    # [B, P + 1, Hq, D]: the cached queries, then the new token's
    first: torch.Tensor      # [B, Hq, D]: row 0 (the new token's when P = 0)
    query_row: torch.Tensor  # [B, Hq, 1, D]: the new token's, in the layout of the model's query
    out: torch.Tensor        # [B, P + 1, Hq, D]: the cached outputs, then the new token's window part
    lse: torch.Tensor        # [B, P + 1, Hq, 1]
    new_out: torch.Tensor    # [B, 1, Hq, D]: the new token's window part
    new_lse: torch.Tensor    # [B, 1, Hq, 1]


class RetroLayer:
    """Output cache of one layer, oldest entry first.

    The device state lives in three float32 row buffers on the model's device, queries [B, R, Hq, D], outputs
    [B, R, Hq, D] and log-sum-exps [B, R, Hq, 1], whose rows [start, start + P) hold the P cached entries. A step
    writes the new token's query and window part into row start + P (`begin`, `put_window`), the merge corrects
    rows [start, start + P + 1) in place, and the commit only moves `start` past the entries it drops: no cat, and
    the commit copies nothing (a torch call costs the model's thread more than these kernels cost the device).
    When the buffers are full, the cached rows move to the front (one copy per buffer every R - P - 1 steps)."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self.seen: list[np.ndarray] = []         # int64 [B, 1, Hq, S] per entry (-1 = none)
        self.seen_from: list[int] = []
        self.start = 0                           # the oldest entry's row in the buffers
        self.buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # queries, outputs, lses
        self._views: dict[tuple[int, int], StepViews] = {}
        self.host: torch.Tensor | None = None    # staging of one reply: [B, 1 + P, Hq, D + 1]
        self.host_parts: tuple[torch.Tensor, ...] = ()  # its views: new token's out, lse; past outs, lses

    def __len__(self) -> int:
        return len(self.seen_from)

    def clear(self) -> None:
        self.keep_newest(0)

    def keep_newest(self, count: int) -> None:
        drop = len(self) - count
        if drop <= 0:
            return
        del self.seen[:drop], self.seen_from[:drop]
        self.start = self.start + drop if count else 0

    def begin(self, query: torch.Tensor) -> StepViews:
        """A step's views, with the new token's query (query [B, Hq, 1, D]) written as float32 into its row (the
        queries of this step's Retrieve: the cached ones stacked below, client.retrieve's past_in_queries)."""
        b, hq, _, d = query.shape
        count = len(self)
        bufs = self.buffers
        if bufs is None or bufs[0].device != query.device or bufs[0].shape[0] != b or bufs[0].shape[2:] != (hq, d):
            if count:
                raise RuntimeError("the retro output cache holds entries of another shape than query "
                                   f"{tuple(query.shape)}")
            rows = 2 * (self.capacity + 1) + SPARE_ROWS
            bufs = self.buffers = (query.new_empty((b, rows, hq, d), dtype=torch.float32),
                                   query.new_empty((b, rows, hq, d), dtype=torch.float32),
                                   query.new_empty((b, rows, hq, 1), dtype=torch.float32))
            self._views.clear()
            self.start = 0
        if self.start + count + 1 > bufs[0].shape[1]:  # full: the cached rows to the front (never overlapping)
            for buf in bufs:
                buf[:, :count].copy_(buf[:, self.start:self.start + count])
            self.start = 0
        views = self._views.get((self.start, count))
        if views is None:
            views = self._views[(self.start, count)] = self._make_views(self.start, count)
        views.query_row.copy_(query)
        return views

    def _make_views(self, start: int, count: int) -> StepViews:
        assert self.buffers is not None
        queries, out, lse = (buf[:, start:start + count + 1] for buf in self.buffers)
        return StepViews(queries=queries, first=queries[:, 0], query_row=queries[:, count:].transpose(1, 2),
                         out=out, lse=lse, new_out=out[:, count:], new_lse=lse[:, count:])

    @staticmethod
    def put_window(views: StepViews, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new token's device-window part (out [B, 1, Hq, D], lse [B, 1, Hq, 1], as
        ops.window_attention(rows=True)) into its row; returns the rows that the merge corrects in place (the
        cached outputs, then the window part): [B, P + 1, Hq, D] and [B, P + 1, Hq, 1], float32."""
        views.new_out.copy_(out)
        views.new_lse.copy_(lse)
        return views.out, views.lse

    def seen_width(self) -> int:
        """The widest entry's seen ids (the plan's seen width)."""
        return self.seen[0].shape[-1] if len(self.seen) == 1 else max(s.shape[-1] for s in self.seen)

    def seen_ids(self) -> np.ndarray:
        """The entries' seen ids stacked: int64 [B, P, Hq, S] (-1 pads the narrower ones; the entry itself at
        w = 2)."""
        if len(self.seen) == 1:
            return self.seen[0]
        width = self.seen_width()
        if all(s.shape[-1] == width for s in self.seen):
            return np.concatenate(self.seen, axis=1)
        first = self.seen[0]
        seen = np.full((first.shape[0], len(self), first.shape[2], width), -1, dtype=np.int64)
        for p, ids in enumerate(self.seen):
            seen[:, p:p + 1, :, :ids.shape[-1]] = ids
        return seen

    def bounds(self, memo: dict[tuple[int, ...], torch.Tensor] | None = None, end: int | None = None
               ) -> torch.Tensor | None:
        """The entries' offload bounds as past_seen_from [B, P], or None where no bound is below `end` (this call's
        ranges end there; no flush since their steps, the usual case): they exclude nothing and are left out (one
        tensor less each way). `memo`: bounds tensors shared by the layers (they hold the same bounds)."""
        if end is not None and min(self.seen_from) >= end:
            return None
        b = self.seen[0].shape[0]
        key = (b, *self.seen_from)
        seen_from = None if memo is None else memo.get(key)
        if seen_from is None:
            seen_from = torch.tensor([self.seen_from] * b, dtype=torch.int64)
            if memo is not None:
                if len(memo) > 64:
                    memo.clear()
                memo[key] = seen_from
        return seen_from

    def request(self, memo: dict[tuple[int, ...], torch.Tensor] | None = None, end: int | None = None
                ) -> dict[str, Any]:
        """The past-query arguments of client.retrieve for the cached entries, whose queries travel stacked below
        the new token's in the queries tensor (`StepViews.queries`); the reply comes as one tensor in the layout
        of `stage` (RetrieveResult.packed). `memo`, `end`: as `bounds`."""
        got: dict[str, Any] = {"packed": True, "past_in_queries": len(self),
                               "past_seen_ids": torch.from_numpy(self.seen_ids())}
        if (seen_from := self.bounds(memo, end)) is not None:
            got["past_seen_from"] = seen_from
        return got

    def note_retrieved(self, ids: np.ndarray) -> None:
        """The positions retrieved this step ([B, 1, Hq, k], host) count as seen by the cached queries that the
        coming commit keeps. Positions at or beyond an entry's bound stay too: kvd never counts them as new for
        it (they were in its window)."""
        for p in range(max(0, len(self) - self.capacity + 1), len(self)):
            self.seen[p] = np.concatenate([self.seen[p], ids], axis=-1)

    def stage(self, res: Any, count: int) -> torch.Tensor:
        """kvd's answer `res` as one host tensor [B, P + 1, Hq, D + 1] (the P past queries' partial attention over
        their newly seen keys, then the new token's over its retrieved keys; lse in the last column), for a single
        host-to-device copy: one copy of RetrieveResult.packed (the same layout) when the call asked for it."""
        packed = getattr(res, "packed", None)
        out = res.output if packed is None else packed
        shape = (out.shape[0], count + 1, out.shape[-2], out.shape[-1] + (packed is None))
        host = self.host
        if host is None or host.shape != shape:
            host = self.host = torch.empty(shape, dtype=torch.float32, pin_memory=torch.cuda.is_available())
            self.host_parts = (host[:, -1, :, :-1], host[:, -1, :, -1], host[:, :-1, :, :-1], host[:, :-1, :, -1])
        if packed is not None:
            host.copy_(packed)
            return host
        parts = self.host_parts
        parts[0].copy_(res.output)
        parts[1].copy_(res.lse)
        if count:
            parts[2].copy_(res.past_output)
            parts[3].copy_(res.past_lse)
        return host

    def commit(self, seen: np.ndarray, seen_from: int) -> None:
        """The step's rows (corrected in place) become the cache, with the new token's seen positions (host
        [B, 1, Hq, k], kept as given) and bound; keeps at most `capacity` entries."""
        self.seen.append(seen)
        self.seen_from.append(seen_from)
        self.keep_newest(min(self.capacity, len(self)))

    def nbytes(self) -> int:
        buffers = sum(t.numel() * t.element_size() for t in self.buffers or ())
        return buffers + sum(s.nbytes for s in self.seen)


_UNWRITTEN = object()


class PastInputs:
    """A prepared plan's past-query inputs, and with its slots (a launch-ahead plan) the reply's views that a retro
    step reads, made once: a torch view costs microseconds and a retro step reads them at every layer (the host's
    small copies go through numpy, which costs less per call). Remembers what the plan's bounds (seen_from)
    hold, which the layers mostly share, so as not to write them again."""

    def __init__(self, plan: Any, slots: dict[str, torch.Tensor] | None) -> None:
        self.plan = plan
        self.queries = plan.queries                # [B, P + 1, Hq, D]
        self.seen_ids = None if plan.seen_ids is None else plan.seen_ids.numpy()  # [B, P, Hq, S] (None: S = 0)
        self.seen_from = plan.seen_from            # [B, P]
        self.written: Any = _UNWRITTEN             # the bounds tensor last written (None: NO_BOUND)
        self.packed: torch.Tensor | None = None
        self.ids: np.ndarray | None = None
        self.past_lse: np.ndarray | None = None
        self.device: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if slots is not None:
            self.packed = slots["packed"]                          # [B, P + 1, Hq, D + 1]
            self.ids = slots["ids"].numpy()[:, None]               # [B, 1, Hq, k]: as the cache keeps seen ids
            self.past_lse = self.packed.numpy()[:, :plan.past, :, -1]  # [B, P, Hq]

    def write(self, cache: RetroLayer, memo: dict[tuple[int, ...], torch.Tensor], end: int | None) -> None:
        """The layer's seen ids and bounds written into the plan's inputs (the queries travel with the new
        token's, `StepViews.queries`)."""
        if self.seen_ids is not None:
            np.copyto(self.seen_ids, cache.seen_ids())
        seen_from = cache.bounds(memo, end)
        if seen_from is self.written:
            return
        if seen_from is None:
            self.seen_from.fill_(NO_BOUND)
        else:
            self.seen_from.copy_(seen_from)
        self.written = seen_from

    def reply_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed reply copied to `device` (queued on the stream), as the outputs [B, P + 1, Hq, D] and
        log-sum-exps [B, P + 1, Hq, 1]: one buffer per plan, views made once (each layer's copy is queued after
        the previous layer's merge has read it)."""
        assert self.packed is not None
        if self.device is None or self.device[0].device != device:
            buffer = torch.empty(self.packed.shape, dtype=torch.float32, device=device)
            d = buffer.shape[-1] - 1
            self.device = (buffer, buffer[..., :d], buffer[..., d:])
        buffer, out, lse = self.device
        buffer.copy_(self.packed, non_blocking=True)
        return out, lse


class RetroState:
    """The output caches of all layers plus the token ids of the cached positions."""

    def __init__(self, window: int) -> None:
        if not 2 <= window <= MAX_WINDOW:
            raise ValueError(f"retro_window must be in [2, {MAX_WINDOW}]")
        self.window = window
        self.layers: list[RetroLayer] = []
        self.ids: torch.Tensor | None = None  # [B, <= w-1] token ids of the cached positions, oldest first
        self.rows: int | None = None           # past rows of the forward under way (None: none prepared)
        self.rerun_rows = 0                    # past positions re-run (summed over steps)
        self.bounds: dict[tuple[int, ...], torch.Tensor] = {}  # memo of the seen_from tensors (RetroLayer.bounds)
        self.corrections = 0                   # (row, past query, head) triples that received new keys
        self._inputs: dict[int, PastInputs] = {}  # by id(plan)

    @property
    def capacity(self) -> int:
        return self.window - 1

    def layer(self, idx: int) -> RetroLayer:
        while len(self.layers) <= idx:
            self.layers.append(RetroLayer(self.capacity))
        return self.layers[idx]

    def cached(self) -> int:
        """Positions the output cache holds in every layer."""
        if not self.layers or self.ids is None:
            return 0
        return min(min(len(layer) for layer in self.layers), self.ids.shape[1])

    def keep_newest(self, count: int) -> None:
        for layer in self.layers:
            layer.keep_newest(count)
        if self.ids is not None:
            self.ids = self.ids[:, self.ids.shape[1] - count:] if count else None

    def reset(self) -> None:
        self.keep_newest(0)
        self.ids = None

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def past_inputs(self, plan: Any) -> PastInputs:
        """The plan's PastInputs, made on first use (again when the plan was prepared anew: new slots)."""
        slots = plan.slots()
        got = self._inputs.get(id(plan))
        if got is None or got.plan is not plan or (slots is not None and got.packed is not slots["packed"]):
            if len(self._inputs) > 64:
                self._inputs.clear()
            got = self._inputs[id(plan)] = PastInputs(plan, slots)
        return got

    def write_past(self, cache: RetroLayer, end: int, plan: Any) -> None:
        """The layer's seen ids and bounds written into a plan's inputs (after the plan's previous run read its
        own): PastInputs.write with the layers' shared bounds."""
        self.past_inputs(plan).write(cache, self.bounds, end)

    def finish(self, cache: RetroLayer, res: Any, base: tuple[torch.Tensor, torch.Tensor], seen_from: int,
               device: torch.device) -> torch.Tensor:
        """The rest of a retro step once kvd answered (`res`, with past fields when the layer's cache holds
        entries; its tensors kept: not views that the next call rewrites): one host-to-device copy of the answer,
        one exact log-sum-exp merge for all rows into `base` (`RetroLayer.put_window`'s rows, filled while kvd
        worked: the cached outputs, then the window part; never empty, each row's window holds at least its own
        token), and the commit. Returns the outputs of all rows, float32 [B, P + 1, Hq, D]."""
        count = len(cache)
        both = cache.stage(res, count).to(device, non_blocking=True)
        d = both.shape[-1] - 1
        out, _ = self.merge(both[..., :d], both[..., d:], base)
        packed = getattr(res, "packed", None)
        past_lse = (res.past_lse if packed is None else packed[:, :count, :, -1]) if count else None
        self.record(cache, res.ids.numpy()[:, None], None if past_lse is None else past_lse.numpy(), seen_from)
        return out

    @staticmethod
    def merge(out_r: torch.Tensor, lse_r: torch.Tensor, base: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """kvd's answer on the device (out_r [B, P + 1, Hq, D], lse_r [B, P + 1, Hq, 1]) merged into `base` (the
        same shapes; the layer's rows, updated in place): the outputs and log-sum-exps of all rows."""
        base_out, base_lse = base
        base_out.lerp_(out_r, torch.sigmoid(lse_r - base_lse))
        torch.logaddexp(base_lse, lse_r, out=base_lse)
        return base_out, base_lse

    def record(self, cache: RetroLayer, ids: np.ndarray, past_lse: np.ndarray | None, seen_from: int) -> None:
        """The host side of a step once its reply is read: the retrieved ids ([B, 1, Hq, k], kept: not a view
        that the next call rewrites) count as seen by the cached queries, the past rows' lse [B, P, Hq] count the
        corrections, and the step's rows are committed."""
        if len(cache):
            cache.note_retrieved(ids)
            if past_lse is not None:
                self.corrections += int(np.count_nonzero(np.isfinite(past_lse)))
        cache.commit(ids, seen_from)


# --- the forward hooks that turn a one-token decode call into a retro step -------------------------------------
def _input_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if isinstance(ids, torch.Tensor) else None


def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Forward pre-hook of the model given to `enable`: with a retro KVDCache, prepend the cached positions'
    token ids to a one-token decode input (the cache rewinds by as many), extend position_ids, and ask only for
    the last position's logits."""
    cache = kwargs.get("past_key_values")
    begin = getattr(cache, "begin_retro_step", None)
    if begin is None:
        return None
    input_ids = _input_ids(args, kwargs)
    past = begin(input_ids if kwargs.get("inputs_embeds") is None else None)
    if past is None:
        return None
    count = past.shape[1]
    assert input_ids is not None
    kwargs = dict(kwargs)
    ids = torch.cat([past.to(input_ids.device, input_ids.dtype), input_ids], dim=1)
    if "input_ids" in kwargs:
        kwargs["input_ids"] = ids
    else:
        args = (ids, *args[1:])
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor):
        back = torch.arange(count, 0, -1, device=position_ids.device, dtype=position_ids.dtype)
        kwargs["position_ids"] = torch.cat([position_ids[..., -1:] - back, position_ids], dim=-1)
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor):  # older transformers
        kwargs["cache_position"] = torch.arange(int(cache_position[-1]) - count, int(cache_position[-1]) + 1,
                                                device=cache_position.device, dtype=cache_position.dtype)
    if _accepts(module, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return args, kwargs


def post_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Outputs of a retro step cover the new token only (for models without logits_to_keep)."""
    cache = kwargs.get("past_key_values")
    done = getattr(cache, "end_retro_step", None)
    if done is None:
        return None
    rows = done()
    if not rows:
        return None
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == rows + 1:
            setattr(output, name, value[:, -1:])  # a ModelOutput keeps attribute and key in step
    return output


def _accepts(module: torch.nn.Module, name: str) -> bool:
    known: dict[str, bool] = module.__dict__.setdefault("_kvd_accepts", {})
    if name not in known:
        known[name] = name in inspect.signature(module.forward).parameters
    return known[name]


def install(model: torch.nn.Module) -> None:
    """Add the retro hooks to `model` (idempotent; inert unless a retro KVDCache is passed)."""
    if getattr(model, "_kvd_retro_hooked", False):
        return
    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.register_forward_hook(post_hook, with_kwargs=True)
    model._kvd_retro_hooked = True


__all__ = ["MAX_WINDOW", "PastInputs", "RetroLayer", "RetroState", "StepViews", "install", "post_hook", "pre_hook"]
