"""Answers of the accuracy model with full attention and through kvd (KVDCache + the real daemon).

kvd protocol for one batch of items (one kvd session per item): the context (everything before SEP) is
prefilled (exactly, as the integration does), SEP is the first decode step (it sends the index hints; its
prediction is not scored), the daemon builds the sessions' indexes (we wait for them), then every question
token is one decode step whose attention over the offloaded part comes from kvd's top-k. Several top-k values
reuse the same sessions: after a pass the sessions are truncated back to the context + SEP and a new cache
continues them (fetching sink + window), so each pass decodes the same questions.

Control, kind "window-only": the same protocol with every Retrieve answered by an empty result, i.e. attention
over sink + window alone. The prefill is exact, so the window's K/V already carry whatever the model copied
into later tokens during the prefill; a task is a test of retrieval only where window-only fails.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch

from bench.accuracy.tasks import Batch

WINDOW_ONLY = "window-only"


@dataclass
class Predictions:
    pred: torch.Tensor           # [B, T] predicted token at every answer position (pred[:, t] from t - 1), 0 else
    logp: torch.Tensor           # [B, T] float32 log-probability of the true answer token there, 0 else


@dataclass
class KvdOutcome:
    pred: torch.Tensor
    logp: torch.Tensor
    retrieved: float             # retrieved keys / offloaded keys, mean over decode steps, layers and items
    offloaded: float             # offloaded keys per step (mean)
    index_share: float           # share of (call, item) retrievals answered by the session's index kind
    decode_s: float


def _fill(out: Predictions, rows: torch.Tensor, cols: torch.Tensor, logits: torch.Tensor,
          targets: torch.Tensor) -> None:
    logits = logits.float()
    out.pred[rows, cols] = logits.argmax(-1)
    out.logp[rows, cols] = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def full_predictions(model: Any, batch: Batch, chunk: int = 8) -> Predictions:
    """Full attention (one teacher-forced forward) at the answer positions."""
    model.set_attn_implementation("sdpa")
    out = Predictions(torch.zeros_like(batch.tokens), torch.zeros(batch.tokens.shape, device=batch.tokens.device))
    for a in range(0, batch.tokens.shape[0], chunk):
        tokens = batch.tokens[a:a + chunk]
        hidden = model.model(input_ids=tokens).last_hidden_state
        rows, cols = batch.answer_mask[a:a + chunk].nonzero(as_tuple=True)
        _fill(out, a + rows, cols, model.lm_head(hidden[rows, cols - 1]), tokens[rows, cols])
    return out


class NoRetrieval:
    """A client whose Retrieve answers an empty set (output 0, log-sum-exp -inf): the window-only control."""

    prepare_retrieve = None  # not forwarded: the cache must call retrieve() below (no prepared plan)

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def retrieve(self, session_ids: Any, layer: int, queries: torch.Tensor, **kwargs: Any) -> Any:
        n, hq, d = queries.shape
        return SimpleNamespace(output=torch.zeros(n, hq, d), lse=torch.full((n, hq), float("-inf")),
                               ids=torch.full((n, hq, 1), -1), counts=[0] * n, index_kinds=[WINDOW_ONLY] * n)


def wait_indexes(client: Any, sids: Sequence[str], timeout: float) -> float:
    """Seconds until every layer of every session has its index ready (0 for flat sessions); -1 on timeout."""
    t0 = time.perf_counter()
    pending = list(sids)
    while pending:
        info = client.get_session(pending[-1])
        if info.index_kind in ("", "flat"):
            return 0.0
        if len(info.indexes) == info.num_layers and all(i["ready"] for i in info.indexes):
            pending.pop()
            continue
        if time.perf_counter() - t0 > timeout:
            return -1.0
        time.sleep(0.2)
    return round(time.perf_counter() - t0, 2)


@torch.no_grad()
def _decode(model: Any, cache: Any, batch: Batch, kind: str, label: str) -> KvdOutcome:
    tokens = batch.tokens
    start, end = batch.prompt_len + 1, tokens.shape[1] - 1
    out = Predictions(torch.zeros_like(tokens), torch.zeros(tokens.shape, device=tokens.device))
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    cache.retrieve_log = []
    fracs: list[float] = []
    offl: list[int] = []
    served = calls = 0
    t0 = time.perf_counter()
    for t in range(start, end):
        logits = model(tokens[:, t:t + 1], past_key_values=cache).logits[:, -1]
        _fill(out, rows, torch.full_like(rows, t + 1), logits, tokens[:, t + 1])
        lay = cache.layers[0]
        offloaded = lay.total - lay.win_len - lay.sink_len
        for _, res in cache.retrieve_log:
            if offloaded > 0:
                fracs.extend(c / offloaded for c in res.counts)
            served += sum(k == kind for k in res.index_kinds)
            calls += len(res.index_kinds)
        offl.append(offloaded)
        cache.retrieve_log.clear()
        _progress(f"{label}: step {t - start + 1}/{end - start}")
    mask = batch.answer_mask
    return KvdOutcome(pred=out.pred * mask, logp=out.logp * mask, retrieved=sum(fracs) / max(1, len(fracs)),
                      offloaded=sum(offl) / max(1, len(offl)),
                      index_share=served / max(1, calls), decode_s=time.perf_counter() - t0)


def _progress(text: str) -> None:
    """Per-step progress on an interactive stderr only (logs get one line per group from the caller)."""
    if sys.stderr.isatty():
        print(f"\r  {text}\033[K", end="", file=sys.stderr, flush=True)


@torch.no_grad()
def kvd_predictions(model: Any, client: Any, batch: Batch, *, kind: str, sink: int, window: int,
                    top_ks: Sequence[int], flush: int = 16, index_params: dict[str, str] | None = None,
                    index_timeout: float = 600.0, label: str = "kvd", retro_window: int = 1,
                    hint_samples: int | None = None, hints_first: bool = False
                    ) -> tuple[dict[int, KvdOutcome], float]:
    """Answers through kvd for each top-k (same sessions). Returns ({k: outcome}, seconds waited for the
    indexes; -1 when they were not ready in time). kind WINDOW_ONLY: the control (flat sessions, no retrieval).
    retro_window > 1: RetroAttention corrects the last retro_window - 1 question steps (kvd_transformers.retro;
    the re-run positions are held back from kvd, hold_tokens = retro_window - 1).
    hint_samples: prefill queries per layer sent as index hints (None: KVDConfig's default). hints_first: flush
    the prefill (its hints included) to kvd before the first decode step; by default the hints ride on the
    first decode step's append, which races that step's Retrieve: a Retrieve that reaches the daemon first
    starts the layer's build without the hints (manager.on_retrieve), and the hints that follow are ignored."""
    import kvd_transformers
    from kvd_transformers import KVDCache, KVDConfig

    kvd_transformers.enable(model)
    tokens = batch.tokens
    sep = batch.prompt_len
    sids = [f"acc-{uuid.uuid4().hex[:10]}-{i}" for i in range(tokens.shape[0])]
    if kind == WINDOW_ONLY:
        client, kind = NoRetrieval(client), "flat"
    retro = retro_window > 1
    cfg = KVDConfig(sink_tokens=sink, window_tokens=window, top_k=top_ks[0],
                    flush_tokens=min(flush, window - (retro_window - 1 if retro else 0)), index=kind,
                    index_params=index_params, retro=retro, retro_window=max(2, retro_window),
                    hold_tokens=retro_window - 1 if retro else 0,
                    **({} if hint_samples is None else {"hint_samples": hint_samples}))
    out: dict[int, KvdOutcome] = {}
    cache = KVDCache(client, session=sids, config=cfg)
    try:
        model(tokens[:, :sep], past_key_values=cache, logits_to_keep=1)
        if hints_first:
            cache.flush()  # the held-back last prefill token and the hints reach kvd before any Retrieve
        model(tokens[:, sep:sep + 1], past_key_values=cache)  # SEP: the first decode step sends the hints
        cache.flush()
        waited = wait_indexes(client, sids, index_timeout)
        for i, k in enumerate(top_ks):
            if i:
                cache.close()
                for sid in sids:
                    client.truncate(sid, sep + 1)
                cache = KVDCache(client, session=sids, config=replace(cfg, top_k=k))
            out[k] = _decode(model, cache, batch, WINDOW_ONLY if isinstance(client, NoRetrieval) else kind,
                             f"{label} k={k}")
    finally:
        cache.close()
        for sid in sids:
            with contextlib.suppress(Exception):
                client.delete_session(sid)
        model.set_attn_implementation("sdpa")
    return out, waited
