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
logits are produced; tokens already emitted never change. Memory: (w-1) x (query + output + lse + at most
(w-1) x top_k seen ids) per layer and row, independent of the generation length.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

MAX_WINDOW = 8


class RetroLayer:
    """Output cache of one layer, oldest entry first."""

    def __init__(self) -> None:
        self.queries: list[torch.Tensor] = []    # host float32 [B, Hq, D] per entry
        self.seen: list[torch.Tensor] = []       # host int64 [B, Hq, S] per entry (-1 = none)
        self.seen_from: list[int] = []
        self.out: torch.Tensor | None = None     # float32 [B, P, Hq, D] on the device
        self.lse: torch.Tensor | None = None     # float32 [B, P, Hq]
        self.host: torch.Tensor | None = None    # staging of one reply: [B, 1 + P, Hq, D + 1]
        self.host_parts: tuple[torch.Tensor, ...] = ()  # its views: new token's out, lse; past outs, lses

    def __len__(self) -> int:
        return len(self.queries)

    def clear(self) -> None:
        self.keep_newest(0)

    def keep_newest(self, count: int) -> None:
        drop = len(self) - count
        if drop <= 0:
            return
        del self.queries[:drop], self.seen[:drop], self.seen_from[:drop]
        if count == 0:
            self.out = self.lse = None
        else:
            assert self.out is not None and self.lse is not None
            self.out, self.lse = self.out[:, drop:], self.lse[:, drop:]

    def request(self, bounds: dict[tuple[int, ...], torch.Tensor] | None = None, end: int | None = None
                ) -> dict[str, Any]:
        """The past-query arguments of client.retrieve for the cached entries (views where one entry is cached,
        the usual w = 2), plus `below`: the cached queries [B, P, Hq, D], which KVDCache._start_retrieve stacks
        before the new token's query (client.retrieve's past_in_queries). `bounds`: a memo of seen_from tensors
        shared by the layers (they hold the same bounds). `end`: where this call's ranges end; when no entry's
        bound is below it (no flush since their steps, the usual case) the bounds exclude nothing and are left out
        (one tensor less each way)."""
        b = self.queries[0].shape[0]
        got: dict[str, Any] = {}
        if end is None or min(self.seen_from) < end:
            key = (b, *self.seen_from)
            seen_from = None if bounds is None else bounds.get(key)
            if seen_from is None:
                seen_from = torch.tensor([self.seen_from] * b, dtype=torch.int64)
                if bounds is not None:
                    if len(bounds) > 64:
                        bounds.clear()
                    bounds[key] = seen_from
            got["past_seen_from"] = seen_from
        # one reply tensor in the layout of `stage` (RetrieveResult.packed); the cached queries travel in the queries
        # tensor, stacked `below` the new one once its host copy arrived (KVDCache._start_retrieve)
        got.update(packed=True, past_in_queries=len(self))
        if len(self) == 1:
            got.update(below=self.queries[0].unsqueeze(1), past_seen_ids=self.seen[0].unsqueeze(1))
            return got
        seen = torch.full((b, len(self), self.seen[0].shape[1], max(s.shape[-1] for s in self.seen)), -1,
                          dtype=torch.int64)
        for p, ids in enumerate(self.seen):
            seen[:, p, :, :ids.shape[-1]] = ids
        got.update(below=torch.stack(self.queries, dim=1), past_seen_ids=seen)
        return got

    def note_retrieved(self, ids: torch.Tensor, capacity: int) -> None:
        """The positions retrieved this step ([B, Hq, k], host) count as seen by the cached queries that the
        coming commit keeps (with `capacity`). Positions at or beyond an entry's bound stay too: kvd never
        counts them as new for it (they were in its window)."""
        for p in range(max(0, len(self) - capacity + 1), len(self)):
            self.seen[p] = torch.cat([self.seen[p], ids], dim=-1)

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

    def rows(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached outputs followed by the new token's device-window part (out [B, Hq, D], lse [B, Hq]):
        [B, P + 1, Hq, D] and [B, P + 1, Hq], float32."""
        out, lse = out.unsqueeze(1), lse.unsqueeze(1)
        if self.out is None or self.lse is None:
            return out.float(), lse
        return torch.cat([self.out, out], dim=1), torch.cat([self.lse, lse], dim=1)  # cat promotes to float32

    def commit(self, out: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, seen: torch.Tensor, seen_from: int,
               capacity: int) -> None:
        """The step's final rows (corrected past outputs, then the new token's; `lse` may hold only the last
        `capacity` rows) become the cache, with the new token's query (host [B, Hq, D]), seen positions and
        bound; keeps at most `capacity` entries."""
        self.queries.append(query)
        self.seen.append(seen)
        self.seen_from.append(seen_from)
        keep = min(capacity, len(self))
        drop = len(self) - keep
        if drop:
            del self.queries[:drop], self.seen[:drop], self.seen_from[:drop]
        self.out = out if out.shape[1] == keep else out[:, out.shape[1] - keep:]
        self.lse = lse if lse.shape[1] == keep else lse[:, lse.shape[1] - keep:]

    def nbytes(self) -> int:
        tensors = [*self.queries, *self.seen, self.out, self.lse]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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
        self.bounds: dict[tuple[int, ...], torch.Tensor] = {}  # memo of the seen_from tensors (RetroLayer.request)
        self._counted = 0                      # corrections counted so far
        self._uncounted: list[torch.Tensor] = []  # past lse of replies not counted yet (counted in batches)

    @property
    def capacity(self) -> int:
        return self.window - 1

    @property
    def corrections(self) -> int:
        """(row, past query, head) triples that received new keys."""
        self._count()
        return self._counted

    def _count(self) -> None:
        if self._uncounted:
            self._counted += int(torch.isfinite(torch.cat([t.reshape(-1) for t in self._uncounted])).sum())
            self._uncounted.clear()

    def layer(self, idx: int) -> RetroLayer:
        while len(self.layers) <= idx:
            self.layers.append(RetroLayer())
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

    def finish(self, cache: RetroLayer, res: Any, base: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor,
               seen_from: int, device: torch.device) -> torch.Tensor:
        """The rest of a retro step once kvd answered (`res`, with past fields when the layer's cache holds
        entries): one host-to-device copy of the answer, one exact log-sum-exp merge for all rows with `base`
        (`cache.rows` of the new token's window part, computed while kvd works: the cached outputs, then the
        window part; never empty, each row's window holds at least its own token), and the commit (the new
        token's host query [B, Hq, D] is kept as given: the caller passes a copy). Returns the outputs of all
        rows, float32 [B, P + 1, Hq, D]."""
        count = len(cache)
        both = cache.stage(res, count).to(device, non_blocking=True)
        out, lse = self.merge(both, count, base)
        packed = getattr(res, "packed", None)
        past_lse = (res.past_lse if packed is None else packed[:, :count, :, -1]) if count else None
        self.record(cache, res.ids, past_lse, out, lse, query, seen_from)
        return out

    def merge(self, both: torch.Tensor, count: int, base: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """kvd's answer on the device ([B, P + 1, Hq, D + 1], as `RetroLayer.stage`) merged with `base`: the
        outputs of all rows and the log-sum-exps of those that stay cached."""
        base_out, base_lse = base
        d = base_out.shape[-1]
        lse_r = both[..., d]
        out = torch.lerp(base_out, both[..., :d], torch.sigmoid(lse_r - base_lse).unsqueeze(-1))
        keep = min(self.capacity, count + 1)  # only the rows that stay cached need their log-sum-exp
        lse = torch.logaddexp(base_lse[:, count + 1 - keep:], lse_r[:, count + 1 - keep:])
        return out, lse

    def record(self, cache: RetroLayer, ids: torch.Tensor, past_lse: torch.Tensor | None, out: torch.Tensor,
               lse: torch.Tensor, query: torch.Tensor, seen_from: int) -> None:
        """The host side of a step once its reply is read: the retrieved ids ([B, Hq, k], kept: not a view that
        the next call rewrites) count as seen by the cached queries, the past rows' lse are counted, and the
        step's rows are committed."""
        if len(cache):
            cache.note_retrieved(ids, self.capacity)
            if past_lse is not None:
                self._uncounted.append(past_lse)
                if len(self._uncounted) >= 256:
                    self._count()
        cache.commit(out, lse, query, ids, seen_from, self.capacity)


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


__all__ = ["MAX_WINDOW", "RetroLayer", "RetroState", "install", "post_hook", "pre_hook"]
