"""RetroAttention benchmark (issue 6): decode through kvd, base path vs retro (KVDCache(retro=True, retro_window=w)),
on a Llama-3-8B-shaped model with random weights.

Two phases, each run once per variant (base, then w in --windows) on the same token stream (the base run
decodes greedily; the retro runs are fed its tokens):
- speed: the full 8B shape (--layers, default 32), a real prefill of --speed-prompt tokens, --speed-steps timed
  decode steps after --warmup: ms/token (median, mean) and the overhead of retro over base;
- accuracy: --acc-layers layers of the same shape (default 2, so that a long generation fits in minutes), a real
  prefill of --prompt tokens, then --new-tokens generated tokens (>= 4K by default). At --samples evenly spread
  steps, per layer, the relative error ||o - o_full|| / ||o_full|| of the new token's attention output against
  an fp32 full-attention reference computed with the same query over the same K/V (a device mirror of every K/V
  the cache wrote), and for retro the error of that position's output after its w-1 corrections; plus the
  relative error of the final hidden state against a full-attention forward over the same tokens, the fraction of
  past query heads that received new keys, and the retrieved keys a corrected output covers (x top_k).

    python bench/retro_bench.py                      # GPU defaults; starts its own daemon (bench/daemon.py)
    python bench/retro_bench.py --cpu-smoke          # tiny shapes on the CPU (checks the script)
    python bench/retro_bench.py --phases accuracy --acc-layers 4 --new-tokens 8192 --index graph

Prints a table last; writes JSON to $OUT/retro_bench.json (if OUT is set) or bench/results/ (after every run,
so that a run cut short keeps what it measured).
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
from collections.abc import Callable
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
from kvd_transformers import KVDCache  # noqa: E402
from kvd_transformers.config import KVDConfig  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from bench.common import kvd_time_split, markdown_table, random_llama, sync, wait_indexes  # noqa: E402
from bench.daemon import Daemon  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="speed,accuracy", help="comma-separated: speed, accuracy")
    p.add_argument("--windows", default="2,4", help="retro windows w to compare with the base path")
    p.add_argument("--layers", type=int, default=32, help="layers of the speed phase's model")
    p.add_argument("--speed-prompt", type=int, default=8192)
    p.add_argument("--speed-steps", type=int, default=64, help="timed decode steps of the speed phase")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--acc-layers", type=int, default=2, help="layers of the accuracy phase's model")
    p.add_argument("--prompt", type=int, default=8192, help="prompt tokens of the accuracy phase")
    p.add_argument("--new-tokens", type=int, default=4096, help="generated tokens of the accuracy phase")
    p.add_argument("--samples", type=int, default=32, help="measured steps of the accuracy phase")
    p.add_argument("--sharpen", type=float, default=1.0,
                   help="scale of the q/k projections (random weights give flat attention; >1 concentrates it)")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--flush", type=int, default=32)
    p.add_argument("--index", default=None, help="index kind of the sessions (default: the daemon's); not wave")
    p.add_argument("--index-params", default=None,
                   help="index params of the sessions, comma-separated key=value (create_session's index_params), "
                        "e.g. window=2,enhance_ef=0 with --index graph")
    p.add_argument("--search-params", default=None,
                   help="comma-separated key=value sent with every decode Retrieve (KVDConfig.search_params), e.g. "
                        "threads=12")
    p.add_argument("--repeat", type=int, default=1,
                   help="speed phase: run base and every window this many times, alternately (shows the noise)")
    p.add_argument("--interleave", action="store_true",
                   help="speed phase: decode base and every window side by side, one cache each, alternating "
                        "within every step (paired per-step differences: robust to a machine whose speed drifts)")
    p.add_argument("--exact", action="store_true", help="force kvd's exact scan")
    p.add_argument("--index-wait", type=float, default=240.0,
                   help="seconds to wait for the sessions' indexes after the prefill (non-flat kinds)")
    p.add_argument("--prepared", action=argparse.BooleanOptionalAction, default=KVDConfig.prepared,
                   help="decode Retrieves as runs of prepared plans (KvdClient.prepare_retrieve; KVDCache's default)")
    p.add_argument("--launch-ahead", action=argparse.BooleanOptionalAction, default=KVDConfig.launch_ahead,
                   help="decode on CUDA: launch the rest of each layer while kvd searches (KVDConfig.launch_ahead)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=KVDConfig.overlap,
                   help="the Retrieve in a worker thread (default: KVDCache's own default, off: two thread "
                        "hand-offs per layer cost more than the window attention's launch they overlap)")
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--target", default=None, help="an existing daemon; default: start one")
    p.add_argument("--memory-budget", default=None, help="memory budget of the started daemon")
    p.add_argument("--daemon-arg", action="append", default=[], help="extra `kvd serve` argument (repeatable)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model and lengths on the CPU")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/retro_bench.json or bench/results/)")
    return p.parse_args(argv)


def smoke(args: argparse.Namespace) -> None:
    """Tiny CPU settings for every knob left at its GPU default."""
    tiny = {"layers": 2, "acc_layers": 2, "speed_prompt": 256, "speed_steps": 16, "warmup": 2, "prompt": 256,
            "new_tokens": 64, "samples": 8, "sink": 16, "window": 64, "flush": 16, "top_k": 8, "prefill_chunk": 128,
            "sharpen": 4.0}
    defaults = parse_args([])
    for key, value in tiny.items():
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# --- model -----------------------------------------------------------------------------------------------------
def build_model(layers: int, args: argparse.Namespace, device: torch.device) -> tuple[Any, LlamaConfig]:
    model, cfg = random_llama(layers, device, args.cpu_smoke, max_positions=1 << 17)
    if args.sharpen != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(args.sharpen)
                layer.self_attn.k_proj.weight.mul_(args.sharpen)
    return model, cfg


# --- measurement cache -----------------------------------------------------------------------------------------
def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D]; k, v [B, Hkv, T, D] -> float32 [B, Hq, D] (GQA: query head h reads KV head h // g)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(b, hkv, hq // hkv, d)
    probs = torch.softmax(torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale, dim=-1)
    return torch.einsum("bhgt,bhtd->bhgd", probs, v.float()).reshape(b, hq, d)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows and heads of ||out - ref|| / ||ref||."""
    return ((out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean().item()


class Probe(KVDCache):
    """A KVDCache that mirrors every K/V it writes (the K/V the run really used) and, at sampled positions,
    compares attention outputs with fp32 full attention over the mirror. Its own time is kept in `probe_s`."""

    def __init__(self, *args: Any, capacity: int, samples: set[int], prompt: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity, self.samples, self.prompt = capacity, samples, prompt
        self.mirror: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.refs: dict[tuple[int, int], torch.Tensor] = {}
        self.seen: dict[tuple[int, int], list[set[int]]] = {}
        self.born: dict[tuple[int, int], int] = {}         # offload end at the sampled position's step
        self.errors: dict[tuple[int, int], list[float]] = {}  # (corrections so far (0: own step), layer) -> errors
        self.exposure: list[float] = []                    # retrieved keys covered after the last correction / k
        self.hidden: dict[int, torch.Tensor] = {}
        self.probe_s = 0.0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        got = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        t = time.perf_counter()
        while len(self.mirror) <= layer_idx:
            b, h, _, d = key_states.shape
            self.mirror.append((key_states.new_empty(b, h, self.capacity, d), key_states.new_empty(b, h, self.capacity,
                                                                                                   d)))
        end, n = self.layers[layer_idx].total, key_states.shape[2]
        self.mirror[layer_idx][0][:, :, end - n:end].copy_(key_states)
        self.mirror[layer_idx][1][:, :, end - n:end].copy_(value_states)
        self.probe_s += time.perf_counter() - t
        return got

    def attend(self, module: torch.nn.Module, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, mask: Any, scale: float) -> torch.Tensor:
        self.retrieve_log = []
        out = super().attend(module, layer_idx, query, key, value, mask, scale)
        n = query.shape[2]
        layer = self.layers[layer_idx]
        total = layer.total
        tracked = [r for r in range(n - 1) if (layer_idx, total - n + r) in self.refs]
        if total - n < self.prompt or (total - 1 not in self.samples and not tracked):
            return out  # the prefill, or nothing to measure
        sync(query.device)  # the step's own work so far stays in the step's time
        t = time.perf_counter()
        ids = self.retrieve_log[-1][1].ids if self.retrieve_log else None
        key_p = (layer_idx, total - 1)
        if total - 1 in self.samples:
            mk, mv = self.mirror[layer_idx]
            ref = full_attention(query[:, :, -1], mk[:, :, :total], mv[:, :, :total], scale)
            self.errors.setdefault((0, layer_idx), []).append(rel_err(out[:, :, -1], ref))
            if self.retro is not None:
                self.refs[key_p] = ref
                self.born[key_p] = layer.offloaded_end()
                self.seen[key_p] = _id_sets(ids, self.born[key_p], query.shape[0] * query.shape[1])
        for r in tracked:  # re-run rows: corrected outputs of past positions
            key_r = (layer_idx, total - n + r)
            ref = self.refs[key_r]
            fixes = n - 1 - r
            self.errors.setdefault((fixes, layer_idx), []).append(rel_err(out[:, :, r], ref))
            fresh = _id_sets(ids, self.born[key_r], query.shape[0] * query.shape[1])
            for got, new in zip(self.seen[key_r], fresh, strict=True):
                got |= new
            if self.retro is not None and fixes == self.retro.capacity:
                self.exposure.append(statistics.mean(len(s) for s in self.seen.pop(key_r)) / self.config.top_k)
                del self.refs[key_r], self.born[key_r]
        self.probe_s += time.perf_counter() - t
        return out

    def note_hidden(self, hidden: torch.Tensor) -> None:
        position = self.layers[0].total - 1
        if position in self.samples:
            self.hidden[position] = hidden[:, -1].float()


def _id_sets(ids: torch.Tensor | None, bound: int, count: int) -> list[set[int]]:
    """Retrieved positions below `bound`, one set per (row, head) (count of them)."""
    if ids is None:
        return [set() for _ in range(count)]
    rows = ids.reshape(-1, ids.shape[-1]).tolist()
    return [{i for i in row if 0 <= i < bound} for row in rows]


# --- runs ------------------------------------------------------------------------------------------------------
def knobs(args: argparse.Namespace, window: int) -> dict[str, Any]:
    got: dict[str, Any] = {"sink_tokens": args.sink, "window_tokens": args.window, "flush_tokens": args.flush,
                           "top_k": args.top_k, "index": args.index, "exact": args.exact, "overlap": args.overlap,
                           "launch_ahead": args.launch_ahead,
                           "prepared": args.prepared}
    if args.index_params:
        got["index_params"] = dict(item.split("=", 1) for item in args.index_params.split(",") if item)
    if args.search_params:
        got["search_params"] = dict(item.split("=", 1) for item in args.search_params.split(",") if item)
    if window > 1:
        got.update(retro=True, retro_window=window)
    return got


def decode_run(model: Any, client: Any, prompt: torch.Tensor, steps: int, window: int, args: argparse.Namespace,
               device: torch.device, stream: list[torch.Tensor] | None, probe: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], list[torch.Tensor], Any]:
    """Prefill `prompt`, then `steps` decode steps (greedy, or fed `stream`). Returns (result, tokens, cache)."""
    kvd_transformers.enable(model)
    sid = f"retro-bench-{uuid.uuid4().hex[:8]}"
    cache: Any = (Probe(client, session=sid, **probe, **knobs(args, window)) if probe is not None
                  else KVDCache(client, session=sid, **knobs(args, window)))
    hook = None
    if isinstance(cache, Probe):
        hook = model.model.norm.register_forward_hook(lambda m, i, o: cache.note_hidden(o))
    res: dict[str, Any] = {"variant": "base" if window == 1 else f"retro w={window}", "window": window}
    try:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(0, prompt.shape[1], args.prefill_chunk):
                out = model(prompt[:, s:s + args.prefill_chunk], past_key_values=cache, logits_to_keep=1)
            cache.flush()
            sync(device)
            res["prefill_s"] = round(time.perf_counter() - t, 2)
            res["index_wait_s"] = None if args.exact else wait_indexes(client, sid, args.index_wait)
            token = out.logits[:, -1:].argmax(-1)
            tokens, times = [token], []
            for i in range(steps):
                if stream is not None:
                    token = stream[i]
                probe_before = getattr(cache, "probe_s", 0.0)
                sync(device)
                t = time.perf_counter()
                logits = model(token, past_key_values=cache).logits
                token = logits[:, -1:].argmax(-1)
                sync(device)
                times.append(time.perf_counter() - t - (getattr(cache, "probe_s", 0.0) - probe_before))
                tokens.append(token)
                if i == args.warmup:
                    cache.stats.reset()
                if i + 1 == min(steps, args.warmup + 32):
                    eta = statistics.mean(times[args.warmup:] or times) * (steps - i - 1)
                    print(f"  {res['variant']}: {1000 * statistics.mean(times[args.warmup:] or times):.1f} ms/token, "
                          f"~{eta:.0f} s to go", flush=True)
    finally:
        if hook is not None:
            hook.remove()
    timed = times[args.warmup:] or times
    st = cache.stats
    res.update({"steps": steps, "ms_per_token_median": round(1000 * statistics.median(timed), 3),
                "ms_per_token_mean": round(1000 * statistics.mean(timed), 3),
                # the integration's decode attention (RPC wait included): the rest of a step is the model itself
                "attention_ms_per_token": round(1000 * st.decode_s / max(1, len(timed)), 3),
                **kvd_time_split(st, len(timed))})
    if cache.retro is not None:
        heads = model.config.num_attention_heads * prompt.shape[0] * model.config.num_hidden_layers
        res["past_heads_with_new_keys_pct"] = round(100 * cache.retro.corrections / max(1, cache.retro.rerun_rows
                                                                                       * heads), 2)
        res["retro_cache_kib_per_layer"] = round(cache.retro.nbytes() / 1024 / len(cache.layers), 1)
    cache.close()
    with contextlib.suppress(Exception):
        client.delete_session(sid)
    return res, tokens, cache


def interleaved_runs(model: Any, client: Any, prompt: torch.Tensor, windows: list[int], args: argparse.Namespace,
                     device: torch.device, around: Callable[[int, str], Any] | None = None) -> list[dict[str, Any]]:
    """Base and every window decoded side by side: one cache (session) each, prefilled one after the other, then
    every step runs each variant on the same token (the base's greedy choice), in an order that alternates from
    step to step. Besides each variant's own medians, `paired_overhead_pct` is the median of the per-step
    differences to the base over the base's median: a drift of the machine's speed hits both alike. `around(step,
    variant)`: a context manager entered around each timed forward (bench/retro_trace.py profiles with it)."""
    kvd_transformers.enable(model)
    variants = [1, *windows]
    caches = {w: KVDCache(client, session=f"retro-bench-{uuid.uuid4().hex[:8]}", **knobs(args, w)) for w in variants}
    rows = {w: {"variant": "base" if w == 1 else f"retro w={w}", "window": w, "interleaved": True} for w in variants}
    times: dict[int, list[float]] = {w: [] for w in variants}
    steps = args.warmup + args.speed_steps
    with torch.no_grad():
        for w in variants:
            sync(device)
            t = time.perf_counter()
            for s in range(0, prompt.shape[1], args.prefill_chunk):
                out = model(prompt[:, s:s + args.prefill_chunk], past_key_values=caches[w], logits_to_keep=1)
            caches[w].flush()
            sync(device)
            rows[w]["prefill_s"] = round(time.perf_counter() - t, 2)
            if w == 1:
                token = out.logits[:, -1:].argmax(-1)
        for w in variants:
            rows[w]["index_wait_s"] = (None if args.exact
                                       else wait_indexes(client, caches[w].session_ids[0], args.index_wait))
        for i in range(steps):
            following = token
            for w in (variants if i % 2 == 0 else variants[::-1]):
                sync(device)
                t = time.perf_counter()
                with around(i, rows[w]["variant"]) if around is not None else contextlib.nullcontext():
                    logits = model(token, past_key_values=caches[w]).logits
                    sync(device)
                times[w].append(time.perf_counter() - t)
                if w == 1:
                    following = logits[:, -1:].argmax(-1)
                if i == args.warmup:
                    caches[w].stats.reset()
            token = following
            if i + 1 == min(steps, args.warmup + 16):
                print("  " + ", ".join(f"{rows[w]['variant']}: {1000 * statistics.median(times[w][args.warmup:]):.1f}"
                                       for w in variants) + " ms/token so far", flush=True)
    base = times[1][args.warmup + 1:]
    for w in variants:
        timed = times[w][args.warmup + 1:]  # the stats were reset during step `warmup`
        st = caches[w].stats
        rows[w].update({"steps": steps, "ms_per_token_median": round(1000 * statistics.median(timed), 3),
                        "ms_per_token_mean": round(1000 * statistics.mean(timed), 3),
                        "step_ms": [round(1000 * t, 2) for t in timed],
                        "attention_ms_per_token": round(1000 * st.decode_s / len(timed), 3),
                        **kvd_time_split(st, len(timed))})
        if w > 1:
            diffs = [b - a for a, b in zip(base, timed, strict=True)]
            rows[w]["paired_overhead_pct"] = round(100 * statistics.median(diffs) / statistics.median(base), 2)
            retro = caches[w].retro
            heads = model.config.num_attention_heads * prompt.shape[0] * model.config.num_hidden_layers
            rows[w]["past_heads_with_new_keys_pct"] = round(100 * retro.corrections / max(1, retro.rerun_rows * heads),
                                                            2)
        caches[w].close()
        with contextlib.suppress(Exception):
            client.delete_session(caches[w].session_ids[0])
    return [rows[w] for w in variants]


def speed_phase(client: Any, args: argparse.Namespace, device: torch.device, windows: list[int],
                rows: list[dict[str, Any]], save: Any) -> None:
    model, cfg = build_model(args.layers, args, device)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.speed_prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)

    def keep(res: dict[str, Any], rep: int, base: dict[str, Any]) -> None:
        res.update(phase="speed", layers=args.layers, prompt=args.speed_prompt, overhead_pct=overhead(res, base))
        if args.repeat > 1:
            res["round"] = rep + 1
        rows.append(res)
        print(json.dumps(res), flush=True)

    steps = args.warmup + args.speed_steps
    stream = None
    for rep in range(args.repeat):
        if args.interleave:
            got = interleaved_runs(model, client, prompt, windows, args, device)
            for res in got:
                keep(res, rep, got[0])
            save()
            continue
        base: dict[str, Any] = {}
        for window in [1, *windows]:
            print(f"speed: {'base' if window == 1 else f'retro w={window}'}", flush=True)
            res, tokens, _ = decode_run(model, client, prompt, steps, window, args, device, stream)
            if stream is None:
                stream = tokens[:-1]
            if window == 1:
                base = res  # each round's rows against that round's base
            keep(res, rep, base)
            save()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def overhead(res: dict[str, Any], base: dict[str, Any]) -> float:
    ms = base["ms_per_token_median"]
    return round(100 * (res["ms_per_token_median"] - ms) / ms, 2)


def accuracy_phase(client: Any, args: argparse.Namespace, device: torch.device, windows: list[int],
                   rows: list[dict[str, Any]], save: Any) -> None:
    model, cfg = build_model(args.acc_layers, args, device)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(2))
    prompt = prompt.to(device)
    steps = args.new_tokens
    last = steps - 1 - max(windows, default=1)  # sampled positions get all their corrections within the run
    picks = torch.linspace(args.warmup, max(args.warmup, last), args.samples).round().long().unique().tolist()
    samples = {args.prompt + i for i in picks}
    probe = {"capacity": args.prompt + steps + 1, "samples": samples, "prompt": args.prompt}
    base: dict[str, Any] = {}
    stream = None
    hidden_ref: dict[int, torch.Tensor] = {}
    for window in [1, *windows]:
        print(f"accuracy: {'base' if window == 1 else f'retro w={window}'}", flush=True)
        res, tokens, cache = decode_run(model, client, prompt, steps, window, args, device, stream, probe)
        if stream is None:
            stream, base = tokens[:-1], res
            hidden_ref = full_attention_hidden(model, prompt, stream, samples)
        res.update(phase="accuracy", layers=args.acc_layers, prompt=args.prompt, new_tokens=steps,
                   samples=len(samples))
        res.update(error_summary(cache.errors, window))
        if window > 1:
            res["retrieved_keys_covered_x_k"] = round(statistics.mean(cache.exposure), 3)
        res["hidden_err_pct"] = round(100 * statistics.mean(rel_err(h, hidden_ref[p]) for p, h in cache.hidden.items()),
                                      3)
        res["overhead_pct"] = overhead(res, base)
        rows.append(res)
        print(json.dumps(res), flush=True)
        save()


def error_summary(errors: dict[tuple[int, int], list[float]], window: int) -> dict[str, Any]:
    """Mean relative errors (%): at the own step and after the last correction, overall and per layer, and by
    number of corrections."""
    def pct(values: list[float]) -> float:
        return round(100 * statistics.mean(values), 3)

    def at(fixes: int) -> list[float]:
        return [e for (j, _), got in errors.items() if j == fixes for e in got]

    layers = sorted({layer for _, layer in errors})
    got: dict[str, Any] = {"attn_err_own_step_pct": pct(at(0)),
                           "attn_err_own_step_by_layer_pct": [pct(errors[(0, layer)]) for layer in layers]}
    if window > 1:
        got["attn_err_corrected_pct"] = pct(at(window - 1))
        got["attn_err_corrected_by_layer_pct"] = [pct(errors[(window - 1, layer)]) for layer in layers]
        got["attn_err_by_corrections_pct"] = [pct(at(j)) for j in range(window)]
    return got


def full_attention_hidden(model: Any, prompt: torch.Tensor, stream: list[torch.Tensor], samples: set[int]
                          ) -> dict[int, torch.Tensor]:
    """Final hidden states at the sampled positions of an exact (SDPA) forward over prompt + fed tokens."""
    ids = torch.cat([prompt, *stream], dim=1)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    kvd_transformers.enable(model)
    return {p: hidden[:, p].float() for p in samples}


# --- report ----------------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    cols = [("phase", "phase"), ("layers", "layers"), ("variant", "variant"), ("round", "round"),
            ("ms_per_token_median", "ms/token"),
            ("overhead_pct", "overhead %"), ("paired_overhead_pct", "paired overhead %"),
            ("kvd_wait_ms_per_token", "kvd wait ms"),
            ("attention_ms_per_token", "attention ms"), ("kvd_rpc_ms_per_token", "call ms"),
            ("kvd_server_ms_per_token", "server ms"), ("kvd_search_ms_per_token", "search ms"),
            ("kvd_attend_ms_per_token", "attend ms"),
            ("attn_err_own_step_pct", "attn err at own step %"), ("attn_err_corrected_pct", "attn err corrected %"),
            ("hidden_err_pct", "hidden err %"), ("past_heads_with_new_keys_pct", "past heads w/ new keys %"),
            ("retrieved_keys_covered_x_k", "keys covered (x k)")]
    return markdown_table(rows, cols)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        smoke(args)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --cpu-smoke")
        device = torch.device("cuda")
    if args.index == "wave":
        raise SystemExit("retro does not support the wave index")
    windows = [int(w) for w in args.windows.split(",") if w]
    phases = [p for p in args.phases.split(",") if p]
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "cpu_count": os.cpu_count()}
    print(json.dumps(env), flush=True)
    out = args.out or os.path.join(os.environ.get("OUT") or str(ROOT / "bench" / "results"),
                                   "retro_bench_cpu_smoke.json" if args.cpu_smoke else "retro_bench.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def save() -> None:
        Path(out).write_text(json.dumps({"env": env, "args": vars(args), "rows": rows,
                                         "note": "random weights (Llama-3-8B layer shape); errors are relative L2 "
                                                 "errors against fp32 full attention on the same K/V"}, indent=1))

    daemon = None
    if args.target is None:
        daemon = Daemon(memory_budget=args.memory_budget, extra_args=args.daemon_arg)
    try:
        client = KvdClient(args.target or daemon.target)  # type: ignore[union-attr]
        for phase in phases:
            run = {"speed": speed_phase, "accuracy": accuracy_phase}[phase]
            run(client, args, device, windows, rows, save)
        client.close()
    finally:
        if daemon is not None:
            daemon.stop()
    save()
    print(f"wrote {out}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
