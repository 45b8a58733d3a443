"""Bounded load test: N concurrent clients against the real daemon on this machine, mixed append / retrieve /
persist, for a fixed number of operations each. Reports throughput and latency percentiles per operation,
error count, and the daemon's peak resident memory against its budget. Prints a table last, writes JSON.

    python bench/load_bench.py --clients 8 --ops 300 [--transport unix|tcp] [--memory-budget 256MiB]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS, KV_HEADS, HEADS, DIM = 4, 8, 32, 128


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes of a process; field RssAnon excludes file pages (the LMDB map, shared libraries)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def client_loop(daemon, index: int, ops: int, prefill: int, transport: str, latencies: dict, errors: list) -> None:
    from kvd_client import KvdError

    client = daemon.client() if transport == "unix" else daemon.tcp_client(shm=False)
    sid = f"load-{index}"
    g = torch.Generator().manual_seed(index)
    try:
        client.create_session(sid, num_layers=LAYERS, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM,
                              dtype="bf16", sink_tokens=16, window_tokens=64)
        keys = torch.randn(LAYERS, KV_HEADS, prefill, DIM, generator=g).to(torch.bfloat16)
        client.append(sid, 0, keys, keys)
        length = prefill
        for op in range(ops):
            kind = "persist" if op % 50 == 49 else ("append" if op % 5 == 4 else "retrieve")
            started = time.perf_counter()
            if kind == "retrieve":
                client.retrieve(sid, op % LAYERS, torch.randn(HEADS, DIM, generator=g), k=100)
            elif kind == "append":
                step = torch.randn(LAYERS, KV_HEADS, 8, DIM, generator=g).to(torch.bfloat16)
                client.append(sid, length, step, step)
                length += 8
            else:
                client.persist(sid)
            latencies.setdefault(kind, []).append(time.perf_counter() - started)
    except KvdError as exc:
        errors.append(f"{sid}: {exc}")
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--prefill", type=int, default=8192)
    parser.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    parser.add_argument("--memory-budget", default="1GiB")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    from tests.conftest import DaemonProcess

    with tempfile.TemporaryDirectory() as tmp:
        daemon = DaemonProcess(Path(tmp), ["--memory-budget", args.memory_budget], tcp=args.transport == "tcp")
        daemon.start()
        peak = [0, 0]
        baseline_anon = rss_bytes(daemon.proc.pid, "RssAnon")
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss_bytes(daemon.proc.pid))
                peak[1] = max(peak[1], rss_bytes(daemon.proc.pid, "RssAnon"))

        sampler = threading.Thread(target=sample)
        sampler.start()
        latencies: dict[str, list[float]] = {}
        errors: list[str] = []
        started = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(daemon, i, args.ops, args.prefill, args.transport,
                                                               latencies, errors)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for i, thread in enumerate(threads):
            thread.join()
            print(f"[load_bench] client {i + 1}/{len(threads)} done", flush=True)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        stats = daemon.client(shm=False).stats()
        daemon.stop()
    total = sum(len(v) for v in latencies.values())
    result = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
              "clients": args.clients, "ops_per_client": args.ops, "prefill_tokens": args.prefill,
              "transport": args.transport, "shape": f"{LAYERS}x{KV_HEADS}x{DIM} bf16, {HEADS} query heads, k=100",
              "elapsed_s": elapsed, "ops_per_s": total / elapsed, "errors": errors,
              "memory_budget_bytes": stats.memory_budget_bytes, "peak_rss_bytes": peak[0],
              "peak_rss_anon_bytes": peak[1], "idle_rss_anon_bytes": baseline_anon,
              "spills": stats.counters.get("spills", 0), "promotions": stats.counters.get("promotions", 0),
              "ops": {kind: {"count": len(v), "p50_ms": 1000 * percentile(v, 0.5),
                             "p99_ms": 1000 * percentile(v, 0.99), "max_ms": 1000 * max(v)}
                      for kind, v in latencies.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"load_bench_{args.transport}_{args.clients}c_{args.memory_budget}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    print(f"{args.clients} clients x {args.ops} ops over {args.transport}: {result['ops_per_s']:.0f} ops/s, "
          f"{len(errors)} errors, peak RSS {peak[0] / 2**20:.0f} MiB, anonymous {peak[1] / 2**20:.0f} MiB "
          f"(idle daemon {baseline_anon / 2**20:.0f} MiB; budget {stats.memory_budget_bytes / 2**20:.0f} MiB of "
          f"KV+indexes), spills {result['spills']:.0f}, promotions {result['promotions']:.0f}")
    print(f"{'op':10s} {'count':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
    for kind, row in sorted(result["ops"].items()):
        print(f"{kind:10s} {row['count']:6d} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['max_ms']:8.2f}")


if __name__ == "__main__":
    main()
