"""Per-call latency of a decode-shaped Retrieve (one sequence, 32 query heads, k=100, partial attention): the
engine called in-process, and the same call through the daemon (shared memory for tensors) over its fast lane
(the client's default) and over gRPC, each with the daemon's own server_ms. Separates search cost, per-call
overhead inside the daemon and transport.

    python -m bench.retrieve_bench --tokens 32768,131072 --kinds flat,graph --index-params window=2,enhance_ef=0
    python -m bench.retrieve_bench --tokens 4096 --kinds flat,graph --calls 50        # quick CPU run

Keys/queries: bench.qkdata.realistic (8 KV heads, 32 query heads, head dim 128), bf16 keys, the prefill
queries (and their exact top-100) as index hints. --profile prints the daemon-side hot spots (cProfile) of
the in-process calls. Prints a table last; writes JSON to $OUT (if set) or bench/results/.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT / "client", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from kvd_client import KvdClient  # noqa: E402

from bench import qkdata  # noqa: E402
from bench.common import markdown_table, spin  # noqa: E402
from bench.daemon import Daemon  # noqa: E402
from kvd.config import load  # noqa: E402
from kvd.engine import Engine  # noqa: E402
from kvd.index.graph_build import exact_topn  # noqa: E402
from kvd.retrieval import Mode  # noqa: E402
from kvd.store.session import ModelShape, SessionOptions  # noqa: E402

K = 100
SINK, WINDOW = 128, 544


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="32768,131072")
    p.add_argument("--kinds", default="flat,graph")
    p.add_argument("--index-params", default="", help="k=v,... for every session")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--hint-queries", type=int, default=1024, help="prefill queries per head sent as hints")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of the fast-lane and prepared calls")
    p.add_argument("--index-wait", type=float, default=600.0)
    p.add_argument("--search-variants", default="",
                   help="';'-separated k=v,... search params also timed through the fast lane, e.g. "
                        "'schedule=ranges;schedule=claim'")
    p.add_argument("--busy", type=int, default=0,
                   help="processes spinning on a core each while the daemon is timed (a GPU process's host threads)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def params_of(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def hints_for(data: qkdata.QKData, n: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, Hq, s, d] prefill queries and their exact top-100 over the offloaded range (absolute ids)."""
    queries = data.prefill_queries[:, : count]
    group = queries.shape[0] // data.keys.shape[0]
    top = torch.stack([exact_topn(data.keys[h // group, SINK: n - WINDOW], queries[h], K) + SINK
                       for h in range(queries.shape[0])])
    return queries.unsqueeze(0), top.unsqueeze(0)


def timed(call: Any, calls: int) -> tuple[float, Any]:
    times, result = [], None
    for i in range(calls + 10):
        started = time.perf_counter()
        result = call(i)
        if i >= 10:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times), result


def in_process(data: qkdata.QKData, n: int, kind: str, params: dict[str, str], args: argparse.Namespace,
               hints: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    config = load(overrides={"storage.data_dir": tempfile.mkdtemp(prefix="kvd-rb-")}, environ={})
    engine = Engine(config)
    engine.start()
    try:
        shape = ModelShape(1, 8, 32, 128, torch.bfloat16)
        engine.create_session("t", "s", shape, SessionOptions(index_kind=kind, index_params=params,
                                                              sink_tokens=SINK, window_tokens=WINDOW), False)
        engine.append("t", "s", 0, [], data.keys.unsqueeze(0).bfloat16(), data.values.unsqueeze(0).bfloat16(),
                      None, hints[0], hints[1])
        queries = data.decode_queries
        engine.retrieve("t", ["s"], 0, queries[:1], K, Mode.ATTENTION, None, 0.0, False, {})
        build_s = wait_ready(engine, args.index_wait)

        def call(i: int) -> Any:
            j = i % queries.shape[0]
            return engine.retrieve("t", ["s"], 0, queries[j: j + 1], K, Mode.ATTENTION, None, 0.0, False, {})

        ms, result = timed(call, args.calls)
        row: dict[str, Any] = {"in_process_ms": round(ms, 3), "index_build_s": build_s,
                               "served_by": result[0][0].index_kind}
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for i in range(min(100, args.calls)):
                call(i)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
            print(f"--- profile: {kind} {n} tokens, 100 calls ---\n{text.getvalue()}", flush=True)
        return row
    finally:
        engine.close()


def wait_ready(engine: Engine, timeout: float) -> float | None:
    started = time.perf_counter()
    slot = engine.session("t", "s").indexes[0]
    while slot is not None and not (slot.ready or slot.failed):
        if time.perf_counter() - started > timeout:
            return -1.0
        time.sleep(0.1)
    return None if slot is None else round(time.perf_counter() - started, 2)


def through_daemon(client: KvdClient, grpc_client: KvdClient, data: qkdata.QKData, n: int, kind: str,
                   params: dict[str, str], args: argparse.Namespace, hints: tuple[torch.Tensor, torch.Tensor]
                   ) -> dict[str, Any]:
    sid = f"rb-{kind}-{n}"
    client.create_session(sid, num_layers=1, num_kv_heads=8, num_query_heads=32, head_dim=128,
                          dtype=torch.bfloat16, index=kind, index_params=params, sink_tokens=SINK,
                          window_tokens=WINDOW)
    client.append(sid, 0, data.keys.unsqueeze(0).bfloat16(), data.values.unsqueeze(0).bfloat16(),
                  hint_queries=hints[0], hint_topn=hints[1])
    queries = data.decode_queries
    client.retrieve(sid, 0, queries[0], k=K)
    started = time.perf_counter()
    while time.perf_counter() - started < args.index_wait:
        if all(i.get("ready", True) for i in client.get_session(sid).indexes):
            break
        time.sleep(0.2)
    row: dict[str, Any] = {}
    plan = client.prepare_retrieve(sid, k=K)
    rounds: dict[str, list[dict[str, float]]] = {"daemon": [], "prepared": [], "grpc": []}
    for label in ["daemon", "prepared"] * max(1, args.rounds) + ["grpc"]:
        results: list[Any] = []

        def call(i: int, label: str = label, results: list = results) -> Any:
            query = queries[i % queries.shape[0]]
            if label == "prepared":
                plan.queries.copy_(query)
                result = plan.run(0)
            else:
                result = (grpc_client if label == "grpc" else client).retrieve(sid, 0, query, k=K)
            results.append(result)
            return result

        ms, result = timed(call, args.calls)
        measured = {"ms": ms, "server_ms": statistics.median(r.server_ms for r in results[10:])}
        for name in SERVER_PARTS:
            measured[name] = statistics.median(getattr(r, name) for r in results[10:])
        rounds[label].append(measured)
        row[f"{label}_served_by"] = result.index_kinds[0]
    plan.close()
    for label, measured in rounds.items():
        ms = statistics.median(m["ms"] for m in measured)
        server_ms = statistics.median(m["server_ms"] for m in measured)
        row[f"{label}_ms"], row[f"{label}_server_ms"] = round(ms, 3), round(server_ms, 3)
        row[f"{label}_transport_ms"] = round(ms - server_ms, 3)
        if len(measured) > 1:
            row[f"{label}_rounds_ms"] = [round(m["ms"], 3) for m in measured]
        if label != "grpc":
            prefix = "" if label == "daemon" else "prepared_"
            for name in SERVER_PARTS:
                row[prefix + name] = round(statistics.median(m[name] for m in measured), 3)
    row["fast_lane"] = client.uses_fast_lane
    variants = []  # in the order given: a repeated variant is timed again (interleaved A/B on one session)
    for text in [v for v in args.search_variants.split(";") if v]:
        per_call: list[tuple[float, float]] = []  # (server ms, of which inside compiled kernels)

        def variant(i: int, search: dict[str, str] = params_of(text), per_call: list = per_call) -> Any:
            result = client.retrieve(sid, 0, queries[i % queries.shape[0]], k=K, search_params=search)
            per_call.append((result.server_ms, result.search_kernel_ms + result.attend_kernel_ms))
            return result

        ms, _ = timed(variant, args.calls)
        steady = per_call[10:]
        variants.append({"variant": text, "ms": round(ms, 3),
                         "server_ms": round(statistics.median(s for s, _ in steady), 3),
                         "kernel_ms": round(statistics.median(k for _, k in steady), 3),
                         "daemon_python_ms": round(statistics.median(s - k for s, k in steady), 3)})
    if variants:
        row["variants"] = variants
    client.delete_session(sid)
    return row


# the daemon's split of its server time (fast lane), medians: what is not kernel is Python around the kernels
SERVER_PARTS = ("search_ms", "search_kernel_ms", "attend_ms", "attend_kernel_ms")


def table(rows: list[dict[str, Any]]) -> str:
    cols = [("tokens", "tokens"), ("kind", "kind"), ("served_by", "served by"), ("in_process_ms", "in-process ms"),
            ("daemon_ms", "fast lane ms"), ("daemon_server_ms", "of which server"),
            ("daemon_transport_ms", "transport+client"), ("search_ms", "search"),
            ("search_kernel_ms", "of which kernel"), ("attend_ms", "attend"), ("attend_kernel_ms", "of which kernel"),
            ("prepared_ms", "prepared ms"), ("prepared_server_ms", "of which server"),
            ("prepared_transport_ms", "transport+client"), ("prepared_search_kernel_ms", "of which kernel"),
            ("grpc_ms", "gRPC ms"), ("grpc_server_ms", "of which server"),
            ("grpc_transport_ms", "transport+client"), ("index_build_s", "build s")]
    return markdown_table(rows, cols)


def variants_table(rows: list[dict[str, Any]]) -> str:
    flat = [{"tokens": r["tokens"], "kind": r["kind"], **v} for r in rows for v in r.get("variants", [])]
    return markdown_table(flat, [("tokens", "tokens"), ("kind", "kind"), ("variant", "search params"),
                                 ("ms", "fast lane ms"), ("server_ms", "of which server"),
                                 ("kernel_ms", "of which kernels"), ("daemon_python_ms", "daemon, not kernels")])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as in the daemon: its pools parallelize, torch ops stay single-threaded
    params = params_of(args.index_params)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "machine": platform.machine()}
    rows: list[dict[str, Any]] = []
    out = Path(args.out or os.path.join(os.environ.get("OUT") or ROOT / "bench" / "results", "retrieve_bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    env["busy_processes"] = args.busy
    spinners: list[subprocess.Popen] = []
    with Daemon() as daemon, KvdClient(daemon.target) as client, \
            KvdClient(daemon.target, fast_lane=False) as grpc_client:
        for n in [int(t) for t in args.tokens.split(",") if t]:
            data = qkdata.realistic(n, n_queries=64)
            hints = hints_for(data, n, args.hint_queries)
            for kind in [k for k in args.kinds.split(",") if k]:
                row: dict[str, Any] = {"tokens": n, "kind": kind}
                row.update(in_process(data, n, kind, params, args, hints))
                spinners = spin(args.busy)
                try:
                    row.update(through_daemon(client, grpc_client, data, n, kind, params, args, hints))
                finally:
                    for proc in spinners:
                        proc.kill()
                        proc.wait()
                print(json.dumps(row), flush=True)
                rows.append(row)
                out.write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))
    print(f"\nwrote {out}\n")
    print(table(rows))
    if any("variants" in r for r in rows):
        print()
        print(variants_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
