"""Where a retro decode step's extra time goes on the GPU host: base vs RetroAttention, decoded side by side
(retro_bench's --interleave), the last --trace-steps steps under torch.profiler. Per step and variant, the
device's timeline is split into

- busy: some kernel, copy or memset runs (by kind: GEMMs, other kernels, copies);
- starved: the device has nothing to run because the model's thread has not launched it yet (the gap before an
  operation up to the end of its launch call): the thread is on the critical path;
- waiting: the operation was launched but waits on something else: the launch-ahead stream wait for kvd's
  reply (cuStreamWaitValue32, which itself shows no activity), or an event.

Also, unless --no-rows-probe, the device time of one forward of the model alone (DynamicCache of sink + window
tokens, SDPA) at 1..4 query rows: what re-running the cached positions costs the GPU by itself.

    python3 bench/retro_trace.py --windows 2 --speed-steps 48 --trace-steps 16 --index graph \\
        --index-params window=2,enhance_ef=0 --out $OUT/retro_trace.json

Takes retro_bench's options (the speed phase's; --interleave is implied). Prints a table last, writes JSON.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gzip
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import retro_bench  # noqa: E402
from bench.common import markdown_table, sync  # noqa: E402

_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
STEP_PREFIX = "kvd-step "


def _kind(event: dict[str, Any]) -> str:
    if event.get("cat") != "kernel":
        return "copy"
    name = event.get("name", "").lower()
    return "gemm" if any(part in name for part in ("gemm", "gemv", "nvjet", "cutlass", "splitk")) else "kernel"


def _is_step(event: dict[str, Any]) -> bool:
    """A step's annotation: "<STEP_PREFIX><variant> <step>"."""
    return event.get("ph") == "X" and event.get("cat") == "user_annotation" \
        and str(event.get("name", "")).startswith(STEP_PREFIX)


def _step_label(event: dict[str, Any]) -> tuple[str, int]:
    variant, _, index = event["name"][len(STEP_PREFIX):].rpartition(" ")
    return variant, int(index)


def split_steps(events: list[dict[str, Any]], starved_at: list[tuple[str, float, float]] | None = None
                ) -> list[dict[str, Any]]:
    """A chrome trace's events (torch.profiler.export_chrome_trace) -> one row per step annotation (name
    "<STEP_PREFIX><variant> <step>", covering the forward and its final device sync): the annotation's wall time and the
    device timeline inside it split into busy (by kind), starved and waiting, in ms; and the operations counted.
    `starved_at` receives each starved interval as (variant, begin us, end us)."""
    launches: dict[int, tuple[float, float]] = {}
    device: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if cat in _LAUNCH_CATS and (corr := e.get("args", {}).get("correlation")) is not None:
            launches[corr] = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        elif cat in _DEVICE_CATS:
            device.append(e)
        elif _is_step(e):
            steps.append(e)
    device.sort(key=lambda e: float(e["ts"]))
    starts = [float(e["ts"]) for e in device]
    rows = []
    for step in sorted(steps, key=lambda e: float(e["ts"])):
        begin, end = float(step["ts"]), float(step["ts"]) + float(step["dur"])
        variant, index = _step_label(step)
        busy: dict[str, float] = defaultdict(float)
        starved = waiting = 0.0
        frontier = begin  # the device is idle from here until the next operation starts
        ops = 0
        lo = bisect.bisect_left(starts, begin)
        for e in device[lo:]:
            ts = float(e["ts"])
            if ts >= end:
                break
            ops += 1
            finish = ts + float(e.get("dur", 0.0))
            if ts > frontier:
                launched = launches.get(e.get("args", {}).get("correlation"), (begin, begin))[1]
                hungry = min(max(launched - frontier, 0.0), ts - frontier)
                starved += hungry
                if starved_at is not None and hungry > 0:
                    starved_at.append((variant, frontier, frontier + hungry))
                waiting += ts - frontier - hungry
            if finish > frontier:
                busy[_kind(e)] += finish - max(ts, frontier)
                frontier = finish
        rows.append({"variant": variant, "step": index, "wall_ms": (end - begin) / 1000,
                     "busy_ms": sum(busy.values()) / 1000, "gemm_ms": busy["gemm"] / 1000,
                     "kernel_ms": busy["kernel"] / 1000, "copy_ms": busy["copy"] / 1000,
                     "starved_ms": starved / 1000, "waiting_ms": waiting / 1000,
                     "tail_ms": max(end - frontier, 0.0) / 1000, "device_ops": ops})
    return rows


def frame_split(events: list[dict[str, Any]], starved_at: list[tuple[str, float, float]],
                patterns: tuple[str, ...]) -> dict[str, dict[str, dict[str, float]]]:
    """With a trace recorded with_stack (python_function events): per variant and per innermost Python function
    whose name holds one of `patterns` ("<outside>" where none is open), the model thread's wall time inside the
    steps (cpu) and the part of it during which the device starved (starved: `starved_at`, from split_steps),
    in us summed over the steps."""
    steps = [e for e in events if _is_step(e)]
    if not steps:
        return {}
    thread = steps[0].get("tid")
    marks: list[tuple[float, int, int, str]] = []
    for i, e in enumerate(events):
        if e.get("ph") == "X" and e.get("cat") == "python_function" and e.get("tid") == thread \
                and any(p in e.get("name", "") for p in patterns):
            ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
            marks += [(ts, 1, i, e["name"]), (ts + dur, 0, i, e["name"])]
    for s in steps:
        variant = _step_label(s)[0]
        marks += [(float(s["ts"]), 2, -1, variant), (float(s["ts"]) + float(s["dur"]), -1, -1, variant)]
    marks.sort(key=lambda m: (m[0], m[1]))
    starved = sorted((a, b) for _, a, b in starved_at)
    covered = [0.0]
    for a, b in starved:
        covered.append(covered[-1] + b - a)
    starts = [a for a, _ in starved]

    def starved_before(t: float) -> float:
        i = bisect.bisect_left(starts, t)  # intervals [0, i) begin before t
        if i == 0:
            return 0.0
        a, b = starved[i - 1]
        return covered[i - 1] + min(max(t - a, 0.0), b - a)

    out: dict[str, dict[str, dict[str, float]]] = {}
    stack: list[tuple[int, str]] = []
    variant: str | None = None
    last = marks[0][0]
    for t, kind, idx, name in marks:
        if variant is not None and t > last:
            frame = _short(stack[-1][1]) if stack else "<outside>"
            got = out.setdefault(variant, {}).setdefault(frame, {"cpu": 0.0, "starved": 0.0})
            got["cpu"] += t - last
            got["starved"] += starved_before(t) - starved_before(last)
        last = t
        if kind == 2:
            variant = name
        elif kind == -1:
            variant = None
        elif kind == 1:
            stack.append((idx, name))
        else:
            for j in range(len(stack) - 1, -1, -1):
                if stack[j][0] == idx:
                    del stack[j]
                    break
    return out


def _short(name: str) -> str:
    """"/path/to/file.py(123): func" -> "file.py: func"."""
    path, _, func = name.partition(": ")
    return f"{path.rsplit('/', 1)[-1].split('(')[0]}: {func}"


def frame_table(split: dict[str, dict[str, dict[str, float]]], steps: dict[str, int], top: int = 25
                ) -> list[dict[str, Any]]:
    """frame_split per step (us), base against each other variant, the largest differences first."""
    base = split.get("base", {})
    rows = []
    for variant, frames in split.items():
        if variant == "base":
            continue
        for frame in set(frames) | set(base):
            mine, theirs = frames.get(frame, {}), base.get(frame, {})
            row = {"variant": variant, "frame": frame}
            for key in ("cpu", "starved"):
                row[f"base_{key}_us"] = round(theirs.get(key, 0.0) / max(1, steps.get("base", 1)), 1)
                row[f"{key}_us"] = round(mine.get(key, 0.0) / max(1, steps.get(variant, 1)), 1)
                row[f"extra_{key}_us"] = round(row[f"{key}_us"] - row[f"base_{key}_us"], 1)
            rows.append(row)
    rows.sort(key=lambda r: -abs(r["extra_cpu_us"]) - abs(r["extra_starved_us"]))
    return rows[:top]


_FIELDS = ("wall_ms", "busy_ms", "gemm_ms", "kernel_ms", "copy_ms", "starved_ms", "waiting_ms", "tail_ms",
           "device_ops")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, the median of every field over its steps; then each variant's difference to "base"."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_variant[row["variant"]].append(row)
    out = [{"variant": v, "steps": len(got), **{f: round(statistics.median(r[f] for r in got), 3) for f in _FIELDS}}
           for v, got in by_variant.items()]
    base = next((r for r in out if r["variant"] == "base"), None)
    if base is not None:
        for r in list(out):
            if r is not base:
                out.append({"variant": f"{r['variant']} - base", "steps": r["steps"],
                            **{f: round(r[f] - base[f], 3) for f in _FIELDS}})
    return out


@contextlib.contextmanager
def _profiled(path: str, stack: bool = False) -> Iterator[torch.profiler.profile]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, with_stack=stack)
    try:
        yield prof
    finally:
        if prof.profiler is not None and prof.profiler.enabled:
            prof.stop()
        if prof.profiler is not None:
            prof.export_chrome_trace(path)


# the Python functions that frame_split attributes time to: ours only, or ours and the model's / torch.nn's
FRAME_LEVELS = {"kvd": ("kvd_transformers", "kvd_client"),
                "any": ("kvd_transformers", "kvd_client", "transformers/", "torch/nn/")}


def save_events(events: list[dict[str, Any]], path: str, last: int) -> None:
    """The events that begin inside the `last` traced steps of each variant, gzipped JSON."""
    steps: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if _is_step(e):
            steps[_step_label(e)[0]].append((float(e["ts"]), float(e["ts"]) + e["dur"]))
    windows = sorted(w for got in steps.values() for w in sorted(got)[-last:])
    if not windows:
        return
    starts = [a for a, _ in windows]

    def inside(ts: float) -> bool:
        i = bisect.bisect_right(starts, ts) - 1
        return i >= 0 and ts <= windows[i][1]

    kept = [e for e in events if e.get("ph") == "X" and inside(float(e.get("ts", 0.0)))]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": kept}, f)


def rows_probe(model: Any, cfg: Any, tokens: int, device: torch.device, rows: tuple[int, ...], reps: int
               ) -> list[dict[str, Any]]:
    """Device time of one forward of `model` with n query rows after `tokens` cached ones (DynamicCache, exact
    attention), per n: the median over `reps` profiled forwards, busy time by kind."""
    from transformers import DynamicCache

    ids = torch.randint(0, cfg.vocab_size, (1, tokens + max(rows)), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :tokens], past_key_values=cache, logits_to_keep=1)
        sync(device)
        path = os.path.join(tempfile.mkdtemp(), "rows.json")
        with _profiled(path) as prof:
            for _ in range(2):  # the first forwards of each shape pick their kernels
                for n in rows:
                    model(ids[:, tokens:tokens + n], past_key_values=cache, logits_to_keep=1)
                    cache.crop(-n)
            sync(device)
            prof.start()
            for rep in range(reps):
                for n in rows:
                    with torch.profiler.record_function(f"{STEP_PREFIX}rows={n} {rep}"):
                        model(ids[:, tokens:tokens + n], past_key_values=cache, logits_to_keep=1)
                        sync(device)
                    cache.crop(-n)
    with open(path) as f:
        traced = split_steps(json.load(f)["traceEvents"])
    got = []
    for n in rows:
        mine = [r for r in traced if r["variant"] == f"rows={n}"]
        got.append({"variant": f"rows={n}", "steps": len(mine),
                    **{f: round(statistics.median(r[f] for r in mine), 3) for f in _FIELDS}})
    return got


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--trace-steps", type=int, default=16, help="the last steps of each variant, profiled")
    own.add_argument("--rows-probe", action=argparse.BooleanOptionalAction, default=True)
    own.add_argument("--probe-reps", type=int, default=10)
    own.add_argument("--stack", action="store_true",
                     help="record Python calls too (slower steps): the model thread's time by innermost function")
    own.add_argument("--save-trace", default="", help="gzipped JSON of the last traced steps' events")
    own.add_argument("--save-steps", type=int, default=4, help="steps per variant that --save-trace keeps")
    mine, rest = own.parse_known_args(argv)
    args = retro_bench.parse_args(rest)
    args.interleave = True
    if args.cpu_smoke:
        retro_bench.smoke(args)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: use --cpu-smoke")
        device = torch.device("cuda")
    windows = [int(w) for w in args.windows.split(",") if w]
    out = args.out or os.path.join(os.environ.get("OUT") or str(ROOT / "bench" / "results"), "retro_trace.json")
    result: dict[str, Any] = {"args": {**vars(args), **vars(mine)}, "env": {"torch": torch.__version__,
                              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                              "cpu_count": os.cpu_count()}}
    model, cfg = retro_bench.build_model(args.layers, args, device)
    if mine.rows_probe:
        result["rows_probe"] = rows_probe(model, cfg, args.sink + args.window, device, (1, 2, 3, 4), mine.probe_reps)
        print(markdown_table(result["rows_probe"], [(f, f) for f in ("variant", *_FIELDS)]), flush=True)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.speed_prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    first_traced = args.warmup + args.speed_steps - mine.trace_steps
    path = os.path.join(tempfile.mkdtemp(), "decode.json")
    daemon = retro_bench.Daemon(memory_budget=args.memory_budget, extra_args=args.daemon_arg) \
        if args.target is None else None
    try:
        client = retro_bench.KvdClient(args.target or daemon.target)  # type: ignore[union-attr]
        with _profiled(path, mine.stack) as prof:
            def around(step: int, variant: str) -> Any:
                if step < first_traced:
                    return contextlib.nullcontext()
                if not prof.profiler or not prof.profiler.enabled:
                    prof.start()
                return torch.profiler.record_function(f"{STEP_PREFIX}{variant} {step}")

            result["runs"] = retro_bench.interleaved_runs(model, client, prompt, windows, args, device, around)
        client.close()
    finally:
        if daemon is not None:
            daemon.stop()
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    starved_at: list[tuple[str, float, float]] = []
    steps = split_steps(events, starved_at=starved_at)
    result["steps"] = steps
    result["summary"] = summarize(steps)
    if mine.stack:
        counts = {r["variant"]: r["steps"] for r in result["summary"]}
        for label, patterns in FRAME_LEVELS.items():
            result[f"frames_{label}"] = frame_table(frame_split(events, starved_at, patterns), counts)
    if mine.save_trace:
        save_events(events, mine.save_trace, mine.save_steps)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    for run in result["runs"]:
        print(f"{run['variant']}: {run['ms_per_token_median']} ms/token (untraced and traced steps), paired "
              f"{run.get('paired_overhead_pct', 0.0)}%")
    for label in FRAME_LEVELS:
        if f"frames_{label}" in result:
            print(f"\nthe model thread by innermost {label} function, us per step:")
            print(markdown_table(result[f"frames_{label}"], [(f, f) for f in (
                "frame", "base_cpu_us", "cpu_us", "extra_cpu_us", "base_starved_us", "starved_us",
                "extra_starved_us")]))
    print(markdown_table(result["summary"], [(f, f) for f in ("variant", "steps", *_FIELDS)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
