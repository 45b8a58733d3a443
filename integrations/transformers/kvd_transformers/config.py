"""The integration's knobs (KVDConfig) and the per-cache counters (CacheStats)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvd_transformers.retro import MAX_WINDOW


@dataclass
class KVDConfig:
    """Knobs of the integration. Defaults follow RetrievalAttention's static pattern (128 sink + 512 recent
    tokens on the device, top-100 retrieved per query head)."""

    sink_tokens: int = 128
    window_tokens: int = 512
    top_k: int = 100
    flush_tokens: int = 32           # decode: append to kvd every this many tokens (<= window_tokens)
    hold_tokens: int = 0             # decode: the newest tokens kept out of kvd (may still be rewritten, e.g.
    #                                  by a retrospective correction); hold_tokens + flush_tokens <= window
    index: str | None = None         # index kind of new sessions: "flat", "hnsw", "graph", "wave"; None = daemon's
    index_params: dict[str, str] | None = None
    exact: bool = False              # force kvd's exact (flat) retrieval path
    exact_prefill: bool = True       # keep all K/V on the device across a multi-forward prefill (exact chunks)
    hint_samples: int = 256          # prefill queries per layer sent to kvd as index hints (0 = none)
    hint_topn: int = 100             # their exact top-N keys computed on the device (0 = send queries only)
    append_chunk_tokens: int = 8192  # largest single append (tokens)
    q_chunk: int = 4096              # prefill attention: queries per SDPA call
    retrieve_chunk: int = 256        # multi-token forwards with an offloaded part: queries per Retrieve call
    overlap: bool = False            # run the Retrieve RPC in a worker thread while the window attention runs
    prepared: bool = True            # decode Retrieves through one prepared plan (KvdClient.prepare_retrieve: a few
    #                                  bytes per call over the fast lane); False: an ordinary Retrieve per call
    launch_ahead: bool = True        # decode on CUDA: the model's thread launches the rest of the layer while kvd
    #                                  searches; the device waits for the results (kvd_transformers.launch_ahead).
    #                                  Needs prepared plans and a fast lane; from the second decode forward on.
    #                                  Its runs leave one core to the model's thread (search param threads)
    async_append: bool = True        # appends from a background thread (False: inline, for debugging)
    kv_dtype: torch.dtype | None = None  # session dtype (default: the model's K/V dtype)
    pinned: bool = False
    ttl_seconds: int = 0
    retro: bool = False              # RetroAttention: correct the last retro_window - 1 decode steps' attention
    #                                  outputs with keys retrieved later (kvd_transformers.retro); needs enable()
    retro_window: int = 2            # w: the step itself plus w - 1 corrected past steps (2 .. 8)
    lookahead: bool = False          # decode: search layer l + 1 with a query formed from layer l's input while
    #                                  layer l runs; layer l + 1 then picks its top-k among those candidates
    #                                  (kvd_transformers.lookahead); needs enable() and a KvdClient
    lookahead_candidates: int = 512  # positions the lookahead search returns per query head (>= top_k)
    search_params: dict[str, str] | None = None     # sent with every decode Retrieve: the index kind's search
    #                                  params (graph: ef, group, ...) and threads, which sizes every parallel
    #                                  region of the daemon's retrieval
    lookahead_params: dict[str, str] | None = None  # sent with the lookahead searches instead

    def validate(self) -> None:
        if self.sink_tokens < 0 or self.window_tokens < 1:
            raise ValueError("sink_tokens must be >= 0 and window_tokens >= 1")
        if not 1 <= self.flush_tokens <= self.window_tokens:
            raise ValueError("flush_tokens must be in [1, window_tokens]")
        if self.hold_tokens < 0 or self.hold_tokens + self.flush_tokens > self.window_tokens:
            raise ValueError("hold_tokens + flush_tokens must be <= window_tokens")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.retro:
            if not 2 <= self.retro_window <= MAX_WINDOW:
                raise ValueError(f"retro_window must be in [2, {MAX_WINDOW}]")
            if self.hold_tokens < self.retro_window - 1:
                raise ValueError("retro needs hold_tokens >= retro_window - 1 (the re-run positions stay out of kvd)")
            if self.index == "wave":
                raise ValueError("retro does not support the wave index (its estimation zone would be counted twice)")
        if self.lookahead:
            if self.retro:
                raise ValueError("lookahead and retro cannot be combined")
            if self.lookahead_candidates < self.top_k:
                raise ValueError("lookahead_candidates must be >= top_k")


@dataclass
class CacheStats:
    """Counters of one cache (per-token overhead measurements in the benchmark)."""

    retrieve_calls: int = 0
    ahead_runs: int = 0            # of which: launch-ahead runs (the device waited for the results, not the thread)
    decode_calls: int = 0          # decode attention calls (one per layer per step)
    decode_s: float = 0.0          # wall time inside decode attention, RPC wait included
    retrieve_wait_s: float = 0.0   # of which: blocked waiting for kvd's answer
    appends: int = 0
    lookahead_searches: int = 0    # lookahead searches started (kvd_transformers.lookahead)
    lookahead_used: int = 0        # decode Retrieves that chose among lookahead candidates instead of searching
    lookahead_failed: int = 0      # lookahead searches that failed (those layers searched as usual)
    lookahead_wait_s: float = 0.0  # of retrieve_wait_s: blocked until a lookahead search had finished
    query_sync_s: float = 0.0      # Retrieve calls: waiting for the query's device-to-host copy
    retrieve_rpc_s: float = 0.0    # Retrieve calls: the client's call, transport and daemon included
    retrieve_server_s: float = 0.0  # of which: inside the daemon's handler (its server_ms)
    retrieve_search_s: float = 0.0  # of which: finding the keys (search_ms)
    retrieve_attend_s: float = 0.0  # of which: attending them (attend_ms)
    retrieve_search_kernel_s: float = 0.0  # of retrieve_search_s: the compiled search kernel alone
    retrieve_attend_kernel_s: float = 0.0  # of retrieve_attend_s: the compiled attention kernel alone

    def reset(self) -> None:
        self.retrieve_calls = self.decode_calls = self.appends = self.ahead_runs = 0
        self.lookahead_searches = self.lookahead_used = self.lookahead_failed = 0
        self.lookahead_wait_s = self.query_sync_s = self.retrieve_rpc_s = self.retrieve_server_s = 0.0
        self.retrieve_search_s = self.retrieve_attend_s = self.retrieve_search_kernel_s = 0.0
        self.retrieve_attend_kernel_s = 0.0
        self.decode_s = self.retrieve_wait_s = 0.0
