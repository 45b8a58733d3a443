"""Decode benchmark of the transformers integration: a Llama-3-8B-shaped model with random bf16 weights
(same cost as the real one) at long contexts, kvd (device window + kvd retrieval) against full attention
(transformers SDPA + DynamicCache) in the same loop where it fits.

Per context: decode ms/token (median over --steps after --warmup), prefill time, GPU memory (peak during
decode, and the KV bytes resident on the GPU versus full attention's), and the per-token split of the kvd
path (time blocked on kvd vs. the rest of the attention calls). Contexts above --real-prefill-max are filled
with synthetic K/V (random, bf16, with per-chunk index hints) appended straight to the session instead of a
real prefill; those rows are labelled "synthetic".

    python bench/decode_bench.py                         # GPU: 32K, 128K, 512K; starts its own daemon
    python bench/decode_bench.py --cpu-smoke             # tiny shapes on the CPU (checks the script)
    python bench/decode_bench.py --target unix:///run/kvd/kvd.sock --contexts 131072 --index graph

Prints a table last; writes JSON to $OUT (if set) or bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT / "client", ROOT / "integrations" / "transformers", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import kvd_transformers  # noqa: E402
import transformers  # noqa: E402
from kvd_client import KvdClient  # noqa: E402
from kvd_transformers import KVDCache, ops  # noqa: E402
from kvd_transformers.config import KVDConfig  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bench.common import (  # noqa: E402
    chunked_prefill,
    kvd_time_split,
    markdown_table,
    random_llama,
    sync,
    wait_indexes,
)
from bench.daemon import Daemon  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="32768,131072,524288", help="comma-separated context lengths")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=8192)
    p.add_argument("--synthetic", choices=["auto", "always", "never"], default="auto",
                   help="auto: synthetic K/V above --real-prefill-max")
    p.add_argument("--real-prefill-max", type=int, default=131072)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--baseline-max", type=int, default=262144, help="largest context tried with full attention")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--flush", type=int, default=32)
    p.add_argument("--index", default=None,
                   help="index kind(s) of the sessions, comma-separated: one kvd row per kind (default: daemon's)")
    p.add_argument("--index-params", default="",
                   help="index params of the sessions, k=v,... (e.g. window=2,enhance_ef=0,ef=256 for graph)")
    p.add_argument("--exact", action="store_true", help="force kvd's exact scan")
    p.add_argument("--launch-ahead", action=argparse.BooleanOptionalAction, default=KVDConfig.launch_ahead,
                   help="decode on CUDA: launch the rest of each layer while kvd searches (KVDConfig.launch_ahead)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=KVDConfig.overlap,
                   help="the Retrieve in a worker thread (default: KVDCache's own default, off: two thread "
                        "hand-offs per layer cost more than the window attention's launch they overlap)")
    p.add_argument("--hint-samples", type=int, default=256)
    p.add_argument("--index-wait", type=float, default=300.0,
                   help="seconds to wait for the session's indexes after the prefill before timing decode")
    p.add_argument("--target", default=None, help="an existing daemon; default: start one")
    p.add_argument("--memory-budget", default=None, help="memory budget of the started daemon (e.g. 110GiB)")
    p.add_argument("--daemon-arg", action="append", default=[], help="extra `kvd serve` argument (repeatable)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model and contexts on the CPU")
    p.add_argument("--lookahead", type=int, default=0,
                   help="decode with lookahead retrieval, this many candidates per query head (0 = off)")
    p.add_argument("--compare-lookahead", default="",
                   help="comma-separated candidate counts: after the timed steps, time as many more of the same "
                        "cache with lookahead on, once per count, and report them beside the plain ones")
    p.add_argument("--search-params", default="",
                   help="k=v,... sent with every decode Retrieve (e.g. ef=384 or group=4,ef=256 for the graph; "
                        "threads=N for the daemon's regions)")
    p.add_argument("--lookahead-params", default="", help="k=v,... sent with the lookahead searches")
    p.add_argument("--compare-search", default="",
                   help="variants (';' between them) timed after the plain steps on the same cache, as many steps "
                        "each: k=v,... search params; lookahead=N turns lookahead on with N candidates; la.k=v is "
                        "a lookahead search param; overlap=0/1 switches the Retrieve worker thread; prepared=0/1 "
                        "the prepared plan (KvdClient.prepare_retrieve) against an ordinary Retrieve per call; "
                        "ahead=0/1 launch-ahead (KVDConfig.launch_ahead). E.g. "
                        "'ef=384;group=4,ef=256;lookahead=512,threads=4,la.threads=12;overlap=0'")
    p.add_argument("--compare-switch-interval", type=float, default=0.0,
                   help="after the timed steps, time as many more with sys.setswitchinterval(this) in the client "
                        "process (how long the model's thread may hold the GIL while kvd's reply waits for it)")
    p.add_argument("--stub-retrieval", action="store_true",
                   help="also run kvd with a client whose retrieve answers instantly (empty result): isolates the "
                        "integration's own per-token overhead from the daemon's retrieval time")
    p.add_argument("--check", action="store_true",
                   help="first check on the device that kvd (k >= offloaded) reproduces full attention's logits")
    p.add_argument("--compare-grpc", action="store_true",
                   help="after each kvd run's timed steps, time as many more on the same cache with a gRPC-only "
                        "client (the fast lane off): both transports in one run")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/decode_bench.json or bench/results/)")
    return p.parse_args(argv)


# --- model ---------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, LlamaConfig]:
    return random_llama(2 if args.cpu_smoke else args.layers, device, args.cpu_smoke, max_positions=1 << 21)


# --- timing helpers --------------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def decode_loop(model: Any, cache: Any, token: torch.Tensor, steps: int, warmup: int, device: torch.device,
                on_warm: Any = None) -> tuple[list[float], torch.Tensor]:
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup and on_warm is not None:
                on_warm()
            sync(device)
            t = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return times, token


class StubRetrieval:
    """Delegates to a real client, except that `retrieve` answers at once with an empty result (lse -inf)."""

    prepare_retrieve = None  # not forwarded: the cache must call retrieve() below (no prepared plan)

    def __init__(self, client: KvdClient) -> None:
        self._client = client
        self._answers: dict[tuple[int, ...], Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def retrieve(self, session_ids: Any, layer: int, queries: torch.Tensor, **kwargs: Any) -> Any:
        shape = tuple(queries.shape)
        got = self._answers.get(shape)
        if got is None:
            from types import SimpleNamespace

            n, hq, d = shape
            got = SimpleNamespace(output=torch.zeros(n, hq, d), lse=torch.full((n, hq), float("-inf")), ids=None,
                                  server_ms=0.0)
            self._answers[shape] = got
        return got


def rpc_floor(client: KvdClient, cfg: LlamaConfig, dtype: torch.dtype, calls: int = 200) -> dict[str, float]:
    """Round trip of one decode-shaped Retrieve (all query heads, k=100) over a 1K-token session: the cost
    per layer that no index can remove; as an ordinary Retrieve and as a prepared plan's run."""
    hkv, hq = cfg.num_key_value_heads, cfg.num_attention_heads
    d = cfg.hidden_size // hq
    sid = f"rpc-floor-{uuid.uuid4().hex[:8]}"
    client.create_session(sid, num_layers=1, num_kv_heads=hkv, num_query_heads=hq, head_dim=d, dtype=dtype,
                          index="flat")
    client.append(sid, 0, torch.randn(1, hkv, 1024, d).to(dtype), torch.randn(1, hkv, 1024, d).to(dtype))
    q = torch.randn(1, hq, d)
    times: dict[str, list[float]] = {"ordinary": [], "prepared": []}
    parts: dict[str, list[float]] = {name: [] for name in ("server_ms", "search_ms", "search_kernel_ms", "attend_ms",
                                                           "attend_kernel_ms")}
    with client.prepare_retrieve([sid], k=100) as plan:
        def ordinary() -> Any:
            return client.retrieve([sid], 0, q, k=100, mode="attention", ranges=[(16, 1000)])

        def prepared() -> Any:
            plan.queries.copy_(q)
            return plan.run(0, [(16, 1000)])

        for rnd in range(4):  # the two forms alternate in rounds: this host's speed drifts
            forms = [("ordinary", ordinary), ("prepared", prepared)]
            for form, call in forms if rnd % 2 == 0 else forms[::-1]:
                for i in range(calls // 4 + 10):
                    t = time.perf_counter()
                    res = call()
                    if i >= 10:
                        times[form].append(time.perf_counter() - t)
                        if form == "ordinary":
                            for name, values in parts.items():
                                values.append(float(getattr(res, name, 0.0)))
    client.delete_session(sid)
    out = {"rpc_floor_ms_median": round(1000 * statistics.median(times["ordinary"]), 3),
           "rpc_floor_prepared_ms_median": round(1000 * statistics.median(times["prepared"]), 3),
           **{f"rpc_floor_{name}": round(statistics.median(values), 3) for name, values in parts.items()}}
    print(json.dumps(out), flush=True)
    return out


# --- kvd runs --------------------------------------------------------------------------------------------------
def parse_params(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--index-params must be k=v,...: {text!r}")
    return dict(pairs)  # type: ignore[arg-type]


def fill_synthetic(client: KvdClient, sid: str, ctx: int, cfg: LlamaConfig, dtype: torch.dtype,
                   device: torch.device, args: argparse.Namespace, index: str | None) -> float:
    """Create `sid` and append ctx tokens of random K/V to every layer. The last append carries the index
    hints, as a real prefill's does: per layer a sample of random queries and their exact top-N keys over
    [sink, ctx), computed on the device (the keys are kept there until then)."""
    hkv, hq = cfg.num_key_value_heads, cfg.num_attention_heads
    d = cfg.hidden_size // hq
    layers = cfg.num_hidden_layers
    client.create_session(sid, num_layers=layers, num_kv_heads=hkv, num_query_heads=hq, head_dim=d, dtype=dtype,
                          index=index, index_params=parse_params(args.index_params), sink_tokens=args.sink,
                          window_tokens=args.window + args.flush)
    gen = torch.Generator(device=device).manual_seed(1)
    chunk = 4096 if not args.cpu_smoke else 256
    kept: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for start in range(0, ctx, chunk):
        n = min(chunk, ctx - start)
        k = torch.randn(layers, hkv, n, d, generator=gen, device=device, dtype=torch.float32)
        k = (k * 1.5 + 0.5).to(dtype)
        v = torch.randn(layers, hkv, n, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
        hints: dict[str, Any] = {}
        if args.hint_samples > 0:
            kept.append(k)
            if start + n == ctx:
                q = torch.randn(layers, hq, args.hint_samples, d, generator=gen, device=device).to(dtype)
                top = []
                for layer in range(layers):
                    keys = torch.cat([c[layer] for c in kept], dim=1)
                    top.append(ops.exact_topn(q[layer], keys, 100, begin=min(args.sink, ctx - 1)))
                hints = {"hint_queries": q.float().cpu(), "hint_topn": torch.stack(top).cpu()}
                kept.clear()
        client.append(sid, start, k.cpu(), v.cpu(), **hints)
    return time.perf_counter() - t0


def run_kvd(model: Any, cfg: LlamaConfig, client: Any, ctx: int, synthetic: bool, device: torch.device,
            args: argparse.Namespace, label: str = "kvd", filled: str | None = None, keep: bool = False,
            index: str | None = None, compare_client: Any = None) -> dict[str, Any]:
    """One kvd run. `filled`: an already filled synthetic session to continue (no new fill); `keep`: leave
    the session in the daemon (for a following run)."""
    kvd_transformers.enable(model)
    sid = filled or f"bench-{ctx}-{uuid.uuid4().hex[:8]}"
    dtype = next(model.parameters()).dtype
    knobs = {"sink_tokens": args.sink, "window_tokens": args.window, "top_k": args.top_k,
             "flush_tokens": args.flush, "index": index, "exact": args.exact, "overlap": args.overlap,
             "launch_ahead": args.launch_ahead,
             "hint_samples": args.hint_samples, "index_params": parse_params(args.index_params) or None,
             "lookahead": args.lookahead > 0 and not isinstance(client, StubRetrieval),
             "lookahead_candidates": args.lookahead or 512,
             "search_params": parse_params(args.search_params) or None,
             "lookahead_params": parse_params(args.lookahead_params) or None}
    res: dict[str, Any] = {"ctx": ctx, "mode": label, "fill": "synthetic" if synthetic else "prefill",
                           "index": index or "default"}
    reset_peak(device)
    gen = torch.Generator(device="cpu").manual_seed(ctx)
    res["session"] = sid
    if synthetic:
        if filled is None:
            res["fill_s"] = round(fill_synthetic(client, sid, ctx, cfg, dtype, device, args, index), 2)
        t = time.perf_counter()
        cache = KVDCache(client, session=sid, **knobs)
        res["rehydrate_s"] = round(time.perf_counter() - t, 3)
        token = torch.randint(0, cfg.vocab_size, (1, 1), generator=gen).to(device)
    else:
        ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=gen).to(device)
        cache = KVDCache(client, session=sid, **knobs)
        t = time.perf_counter()
        seconds, logits = chunked_prefill(model, ids, cache, args.prefill_chunk)
        res["prefill_s"] = round(seconds, 2)
        cache.flush()
        res["prefill_with_kvd_ingest_s"] = round(time.perf_counter() - t, 2)
        res["prefill_gpu_peak_gib"] = peak_gib(device)
        token = logits.argmax(-1)
        del logits
    # the first decode step trims the device part to sink + window and sends the prefill's index hints; then
    # wait until the daemon has built the indexes (until then it serves layers by the exact scan)
    with torch.no_grad():
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    cache.flush()
    if not isinstance(client, StubRetrieval):
        res["index_ready_s"] = wait_indexes(client, sid, args.index_wait)
    times, token = decode_loop(model, cache, token, args.steps, args.warmup, device,
                               on_warm=lambda: (reset_peak(device), cache.stats.reset()))
    st = cache.stats
    steps = max(1, args.steps)
    resident = sum(layer.buf_k.numel() + layer.buf_v.numel() for layer in cache.layers
                   if layer.buf_k is not None and layer.buf_v is not None) * dtype.itemsize
    full_kv = ctx * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    full_kv *= dtype.itemsize
    res.update({
        "decode_ms_median": round(1000 * statistics.median(times), 2),
        "decode_ms_min": round(1000 * min(times), 2),
        **kvd_time_split(st, steps),
        "retrieves_per_token": round(st.retrieve_calls / steps, 1),
        "appends_per_token": round(st.appends / steps, 3),
        "gpu_peak_gib": peak_gib(device),
        "gpu_kv_resident_mib": round(resident / 2**20, 1),
        "gpu_kv_fraction_pct": round(100 * resident / full_kv, 3),
        "fast_lane": bool(getattr(client, "uses_fast_lane", False)),
        "lookahead_used_per_token": round(st.lookahead_used / steps, 2),
    })
    def more_steps() -> tuple[float, float]:
        """Time as many steps again on the same cache (one warm-up): median ms/token, kvd wait ms/token."""
        nonlocal token
        times, token = decode_loop(model, cache, token, args.steps, 1, device, on_warm=cache.stats.reset)
        return round(1000 * statistics.median(times), 2), round(1000 * cache.stats.retrieve_wait_s / steps, 2)

    real = not isinstance(client, StubRetrieval)
    if args.compare_switch_interval and real:
        default_interval = sys.getswitchinterval()
        sys.setswitchinterval(args.compare_switch_interval)
        try:
            res["switch_interval_decode_ms_median"], res["switch_interval_kvd_wait_ms_per_token"] = more_steps()
        finally:
            sys.setswitchinterval(default_interval)
    for count in [int(c) for c in args.compare_lookahead.split(",") if c and real]:
        cache.set_lookahead(count)
        median, wait = more_steps()
        st = cache.stats
        res.setdefault("lookahead", []).append({
            "candidates": count, "decode_ms_median": median, "kvd_wait_ms_per_token": wait,
            "search_wait_ms_per_token": round(1000 * st.lookahead_wait_s / steps, 2),
            "used_per_token": round(st.lookahead_used / steps, 2)})
        res[f"lookahead{count}_decode_ms_median"] = median
        cache.set_lookahead(None)
    if real:
        for text in [v.strip() for v in args.compare_search.split(";") if v.strip()]:
            res.setdefault("search_variants", []).append(time_variant(cache, text, more_steps, steps))
    if compare_client is not None:
        cache.client = compare_client
        res["grpc_decode_ms_median"], res["grpc_kvd_wait_ms_per_token"] = more_steps()
    if real:
        info = client.get_session(sid)
        res["kvd_session_gib"] = round(info.memory_bytes / 2**30, 2)
        res["kvd_index_gib"] = round(sum(i["bytes"] for i in info.indexes) / 2**30, 2)
        res["kvd_indexes_from_hints"] = f"{sum(bool(i.get('from_hints')) for i in info.indexes)}/{len(info.indexes)}"
    cache.close()
    if not keep:
        with contextlib.suppress(Exception):
            client.delete_session(sid)
    return res


def time_variant(cache: KVDCache, text: str, more_steps: Any, steps: int) -> dict[str, Any]:
    """More steps of the same cache with one --compare-search variant's params, then the cache's own back."""
    params = parse_params(text)
    candidates = int(params.pop("lookahead", 0))
    overlap = params.pop("overlap", None)
    prepared = params.pop("prepared", None)
    ahead = params.pop("ahead", None)
    lookahead = {k.removeprefix("la."): v for k, v in params.items() if k.startswith("la.")}
    search = {k: v for k, v in params.items() if not k.startswith("la.")}
    before = cache.config
    cache.config = replace(before, search_params=search or None, lookahead_params=lookahead or None,
                           prepared=before.prepared if prepared is None else prepared != "0",
                           launch_ahead=before.launch_ahead if ahead is None else ahead != "0")
    if candidates:
        cache.set_lookahead(candidates)
    if overlap is not None:
        cache.set_overlap(overlap != "0")
    try:
        median, _ = more_steps()
    finally:
        if candidates:
            cache.set_lookahead(None)
        if overlap is not None:
            cache.set_overlap(before.overlap)
        cache.config = before
    st = cache.stats
    row = {"variant": text, "decode_ms_median": median, **kvd_time_split(st, steps)}
    if candidates:
        row["lookahead_search_wait_ms_per_token"] = round(1000 * st.lookahead_wait_s / steps, 2)
        row["lookahead_used_per_token"] = round(st.lookahead_used / steps, 2)
    print(f"  variant {text}: {median} ms/token", flush=True)
    return row


def process_memory_gib(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a local process (Linux /proc), GiB."""
    fields = {"VmRSS": "kvd_daemon_rss_gib", "VmHWM": "kvd_daemon_peak_rss_gib"}
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                out[fields[name]] = round(int(value.split()[0]) / 2**20, 2)
    return out


def run_full(model: Any, cfg: LlamaConfig, ctx: int, device: torch.device, args: argparse.Namespace
             ) -> dict[str, Any]:
    model.set_attn_implementation("sdpa")
    res: dict[str, Any] = {"ctx": ctx, "mode": "full", "fill": "prefill"}
    reset_peak(device)
    cache = DynamicCache(config=cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx)).to(device)
    try:
        seconds, logits = chunked_prefill(model, ids, cache, args.prefill_chunk)
        res["prefill_s"] = round(seconds, 2)
        token = logits.argmax(-1)
        del logits
        times, _ = decode_loop(model, cache, token, args.steps, args.warmup, device)
        res["decode_ms_median"] = round(1000 * statistics.median(times), 2)
        res["decode_ms_min"] = round(1000 * min(times), 2)
        res["gpu_peak_gib"] = peak_gib(device)
    except torch.OutOfMemoryError:
        res["oom"] = True
    finally:
        del cache
        reset_peak(device)
    return res


def exactness_check(client: KvdClient, device: torch.device) -> dict[str, Any]:
    """Tiny fp32 Llama on the benchmark device: prefill + 48 decode steps through kvd with k larger than the
    offloaded part must give full attention's logits (exercises pinned copies, events, worker threads)."""
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (2, 400), device=device)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits[:, 351:]
        kvd_transformers.enable(model)
        cache = KVDCache(client, sink_tokens=16, window_tokens=64, flush_tokens=16, top_k=4096)
        got = [model(ids[:, :352], past_key_values=cache).logits[:, -1]]
        for t in range(352, 400):
            got.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    diff = (torch.stack(got[:-1], 1) - ref[:, :-1]).abs().max().item()
    cache.close()
    res = {"check": "kvd vs full attention, fp32, batch 2, 48 decode steps", "max_abs_logit_diff": diff,
           "retrieves": cache.stats.retrieve_calls, "ok": diff < 1e-3}
    print(json.dumps(res), flush=True)
    return res


# --- report ----------------------------------------------------------------------------------------------------
def lookahead_counts(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({entry["candidates"] for row in rows for entry in row.get("lookahead", [])})


def variant_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The --compare-search variants of every kvd row, each with its ratio to that row's plain steps."""
    out = []
    for row in rows:
        for v in row.get("search_variants", []):
            out.append({"ctx": row["ctx"], **v, "vs_plain": round(v["decode_ms_median"] / row["decode_ms_median"], 3)})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("ctx", "ctx"), ("mode", "mode"), ("fill", "fill"), ("decode_ms_median", "decode ms/tok"),
            ("vs_full", "x full"), ("kvd_wait_ms_per_token", "kvd wait ms"),
            ("attention_other_ms_per_token", "attn other ms"), ("kvd_query_sync_ms_per_token", "q copy ms"),
            ("kvd_rpc_ms_per_token", "call ms"), ("kvd_server_ms_per_token", "of which server ms"),
            ("kvd_search_ms_per_token", "search ms"), ("kvd_search_kernel_ms_per_token", "of which kernel ms"),
            ("kvd_attend_ms_per_token", "attend ms"), ("kvd_attend_kernel_ms_per_token", "of which kernel ms"),
            ("prefill_s", "prefill s"),
            ("fill_s", "synth fill s"), ("index_ready_s", "index wait s"), ("gpu_peak_gib", "GPU peak GiB"),
            ("gpu_kv_fraction_pct", "KV on GPU %"), ("grpc_decode_ms_median", "over gRPC ms/tok"),
            *[(f"lookahead{c}_decode_ms_median", f"lookahead {c} ms/tok") for c in lookahead_counts(rows)],
            ("switch_interval_decode_ms_median", "short GIL switch ms/tok"),
            ("kvd_index_gib", "index GiB"),
            ("kvd_daemon_peak_rss_gib", "kvd peak RSS GiB")]
    return markdown_table(rows, cols, lambda row, key: "OOM" if row.get("oom") and key == "decode_ms_median" else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        if args.contexts == parse_args([]).contexts:
            args.contexts = "384,1024"
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 2)
        args.prefill_chunk = min(args.prefill_chunk, 256)
        args.real_prefill_max = min(args.real_prefill_max, 512)
        args.sink, args.window, args.flush, args.top_k = 16, 64, 16, 32
        args.hint_samples = min(args.hint_samples, 32)
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --cpu-smoke")
        device = torch.device("cuda")
    contexts = [int(c) for c in args.contexts.split(",") if c]
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "cpu_count": os.cpu_count()}
    print(json.dumps(env), flush=True)
    out = args.out
    if out is None:
        base = os.environ.get("OUT") or str(ROOT / "bench" / "results")
        name = "decode_bench_cpu_smoke.json" if args.cpu_smoke else "decode_bench.json"
        out = os.path.join(base, name)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def save() -> None:  # after every row, so that a run cut short keeps what it measured
        result = {"env": env, "args": vars(args), "rows": rows,
                  "note": "random bf16 weights (Llama-3-8B shape); 'synthetic' rows: session filled with random "
                          "K/V and index hints instead of a real prefill; 'kvd-stub': retrieval answered "
                          "instantly (integration overhead only)"}
        Path(out).write_text(json.dumps(result, indent=1))

    kinds: list[str | None] = [k for k in (args.index or "").split(",") if k] or [None]
    daemon = None if args.target else Daemon(args.memory_budget, None, args.daemon_arg)
    target = args.target or daemon.target  # type: ignore[union-attr]
    try:
        model, cfg = build_model(args, device)
        client = KvdClient(target)
        grpc_client = KvdClient(target, fast_lane=False) if args.compare_grpc else None
        if args.check:
            env["check"] = exactness_check(client, device)
        env.update(rpc_floor(client, cfg, next(model.parameters()).dtype))
        if grpc_client is not None:
            env.update({f"grpc_{k}": v for k, v in rpc_floor(grpc_client, cfg, next(model.parameters()).dtype).items()})
        for ctx in contexts:
            synthetic = args.synthetic == "always" or (args.synthetic == "auto" and ctx > args.real_prefill_max)
            full = None
            if args.baseline and ctx <= args.baseline_max:
                full = run_full(model, cfg, ctx, device, args)
                print(json.dumps(full), flush=True)
                rows.append(full)
                save()
            runs = []
            for kind in kinds:
                label = f"kvd-{kind}" if kind else "kvd"
                try:
                    res = run_kvd(model, cfg, client, ctx, synthetic, device, args, label=label, keep=synthetic,
                                  index=kind, compare_client=grpc_client)
                except torch.OutOfMemoryError:
                    res = {"ctx": ctx, "mode": label, "oom": True}
                if daemon is not None:
                    res.update(process_memory_gib(daemon.proc.pid))
                runs.append(res)
                if synthetic and "session" in res and not (args.stub_retrieval and kind == kinds[-1]):
                    with contextlib.suppress(Exception):
                        client.delete_session(res["session"])
            if args.stub_retrieval:
                # a synthetic session is reused (continued) rather than filled again
                last = runs[-1]
                runs.append(run_kvd(model, cfg, StubRetrieval(client), ctx, synthetic, device, args,
                                    label="kvd-stub", filled=last.get("session") if synthetic else None,
                                    index=kinds[-1] if synthetic else "flat"))  # no index builds in the background
            for r in runs:
                if full and "decode_ms_median" in full and "decode_ms_median" in r:
                    r["vs_full"] = round(r["decode_ms_median"] / full["decode_ms_median"], 2)
                print(json.dumps(r), flush=True)
                rows.append(r)
                save()
        client.close()
        if grpc_client is not None:
            grpc_client.close()
    finally:
        if daemon is not None:
            daemon.stop()
    save()
    print(f"\nwrote {out}\n")
    print(f"rpc floor (decode-shaped Retrieve over 1K tokens): {env.get('rpc_floor_ms_median')} ms (prepared "
          f"{env.get('rpc_floor_prepared_ms_median')} ms), server "
          f"{env.get('rpc_floor_server_ms')} ms (search kernel {env.get('rpc_floor_search_kernel_ms')}, attend kernel "
          f"{env.get('rpc_floor_attend_kernel_ms')})")
    variants = variant_rows(rows)
    if variants:
        print(markdown_table(variants, [("ctx", "ctx"), ("variant", "search variant (same cache)"),
                                        ("decode_ms_median", "decode ms/tok"), ("vs_plain", "x plain"),
                                        ("kvd_wait_ms_per_token", "kvd wait ms"),
                                        ("kvd_server_ms_per_token", "server ms"), ("kvd_search_ms_per_token",
                                                                                  "search ms")]))
        print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
