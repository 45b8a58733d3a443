"""Lookahead retrieval (`KVDCache(lookahead=True)`): a decode step's search for layer l + 1 runs while layer l
does.

Without it every layer's Retrieve searches the index on the critical path: 32 sequential searches per token
for a Llama-3-8B. With it, a forward pre-hook on decoder layer l takes the layer's input hidden state h_l and
forms layer l + 1's query from it the way layer l + 1 will (its input norm, q projection, q norm if the
model has one, rotary embedding of the current position). It then asks kvd, from a second connection, for the
`lookahead_candidates` best positions of that approximate query (mode "ids": only the index search). When
layer l + 1 attends, its Retrieve passes those positions as candidates: kvd scores them with the true query,
attends the top-k of them and does not search. So the search runs beside layer l's GPU work and its own
Retrieve. The residual stream changes little from one layer to the next, so h_l predicts layer l + 1's
query well; InfiniGen (OSDI '24) speculates from the previous layer the same way. Layer 0 searches with its
true query as without lookahead.

Positions that leave the device window between the search and the attention (a decode flush) are added to
the candidates, so nothing offloaded is missed for lack of a search.
"""

from __future__ import annotations

import functools
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvd_transformers.config import CacheStats
from kvd_transformers.layer import QueryStage


class LookaheadState:
    """A cache's lookahead searches: their connection, worker thread, staging buffers and results in flight."""

    def __init__(self, client: Any, candidates: int, stats: CacheStats, params: dict[str, str] | None = None
                 ) -> None:
        sibling = getattr(client, "sibling", None)
        if sibling is None:
            raise ValueError("lookahead needs a client with sibling() (kvd_client.KvdClient): its searches "
                             "overlap the decode step's own Retrieve on a second connection")
        self.client = sibling()
        self.candidates = candidates
        self.params = params  # the searches' params (e.g. fewer threads than the decode's own Retrieves)
        self.stats = stats
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="kvd-lookahead")
        self._pending: dict[int, tuple[Future[Any], int]] = {}  # layer -> (search, offloaded end it covered)
        self._staging: dict[int, QueryStage] = {}   # layer -> its approximate query's host buffer

    def start(self, layer_idx: int, query: torch.Tensor, sids: list[str], ranges: list[tuple[int, int]],
              end: int) -> None:
        """Search layer `layer_idx` with an approximate query [B, Hq, 1, D] over `ranges` (offloaded up to end)."""
        host, event = self._staging.setdefault(layer_idx, QueryStage()).put(query[:, :, 0])
        client, k, params = self.client, self.candidates, self.params

        def search() -> torch.Tensor:
            if event is not None:
                event.synchronize()
            return client.retrieve(sids, layer_idx, host, k=k, mode="ids", ranges=ranges, search_params=params).ids

        self._pending[layer_idx] = (self.worker.submit(search), end)
        self.stats.lookahead_searches += 1

    def take(self, layer_idx: int, end: int) -> torch.Tensor | None:
        """The candidates [B, Hq, C] for layer `layer_idx` now offloaded up to `end`, or None (no search was
        started, or it failed: the caller searches as usual)."""
        entry = self._pending.pop(layer_idx, None)
        if entry is None:
            return None
        future, searched_end = entry
        t0 = time.perf_counter()
        try:
            ids = future.result()
        except Exception:  # e.g. the session changed under the search: fall back to a normal Retrieve
            self.stats.lookahead_failed += 1
            return None
        finally:
            waited = time.perf_counter() - t0
            self.stats.retrieve_wait_s += waited
            self.stats.lookahead_wait_s += waited
        if end > searched_end:  # flushed out of the device window since the search
            fresh = torch.arange(searched_end, end, dtype=ids.dtype)
            ids = torch.cat([ids, fresh.expand(*ids.shape[:2], -1)], dim=2)
        self.stats.lookahead_used += 1
        return ids

    def drop(self, layer_idx: int) -> None:
        """Forget a search whose layer attends another way this step (it finishes in the background)."""
        self._pending.pop(layer_idx, None)

    def close(self) -> None:
        self._pending.clear()
        self.worker.shutdown(wait=True)
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


# --- model hooks -----------------------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    return getattr(decoder, "layers", None)


def install(model: torch.nn.Module) -> None:
    """Hook every decoder layer (idempotent; inert unless a KVDCache(lookahead=True) is passed)."""
    layers = decoder_layers(model)
    if layers is None or getattr(model, "_kvd_lookahead_hooked", False):
        return
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(functools.partial(_before_layer, index, layers), with_kwargs=True)
    model._kvd_lookahead_hooked = True


def _before_layer(index: int, layers: Any, module: torch.nn.Module, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> None:
    cache = kwargs.get("past_key_values")
    if getattr(cache, "lookahead", None) is None or index + 1 >= len(layers):
        return
    hidden = args[0] if args else kwargs.get("hidden_states")
    rotary = kwargs.get("position_embeddings")
    if hidden is None or rotary is None or hidden.shape[1] != 1 or not cache.wants_lookahead(index + 1):
        return
    with torch.no_grad():
        query = next_query(layers[index + 1], hidden, rotary)
    cache.start_lookahead(index + 1, query, kwargs.get("attention_mask"))


def next_query(layer: torch.nn.Module, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
               ) -> torch.Tensor:
    """The query `layer` would compute if `hidden` [B, n, H] were its input: [B, Hq, n, D]."""
    attn = layer.self_attn
    q = attn.q_proj(layer.input_layernorm(hidden))
    q = q.view(*hidden.shape[:2], -1, attn.head_dim)
    q_norm = getattr(attn, "q_norm", None)  # Qwen3-style per-head norm
    if q_norm is not None:
        q = q_norm(q)
    q = q.transpose(1, 2)
    apply_rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if apply_rotary is None:
        raise NotImplementedError(f"lookahead needs the model's apply_rotary_pos_emb ({type(attn).__name__})")
    cos, sin = rotary
    return apply_rotary(q, q, cos, sin)[0]


__all__ = ["LookaheadState", "decoder_layers", "install", "next_query"]
