"""Where a decode Retrieve's time goes on this host, below the daemon: thread hand-offs, the graph search's
per-head cost alone and under concurrency, the search spread over the worker pool (kvd.workers) against one
numba parallel region (kvd.parallel: OpenMP threads that spin between calls), each also after a pause (a
decode step's other work), and a process-to-process socket round trip. With cold caches: the layer's keys and
graph rows on 4 KiB pages against huge pages (kvd.hugepages), and search variants (--variants: ef, group, ...)
with their recall@100 against brute force.

    python -m bench.dispatch_bench --tokens 131072                  # one 128K layer, 8 KV x 32 query heads
    python -m bench.dispatch_bench --tokens 16384 --reps 50         # quick CPU run

Keys/queries: bench.qkdata.realistic, bf16, the graph's fast-build preset (window=2, enhance_ef=0) built from
the prefill queries. Each figure is the median of --reps calls. Prints a table last; writes JSON to $OUT (if
set) or bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import qkdata  # noqa: E402
from bench.common import markdown_table  # noqa: E402
from kvd import hugepages, parallel, workers  # noqa: E402
from kvd.index import graph_kernels as gk  # noqa: E402
from kvd.index.base import BuildHints, IndexShape, StoredKeys  # noqa: E402
from kvd.index.graph import GraphIndex  # noqa: E402
from kvd.index.graph_build import exact_topn  # noqa: E402

K = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--ef", type=int, default=512)
    p.add_argument("--threads", default="", help="comma-separated thread counts (default 1,2,4,.. up to the cores)")
    p.add_argument("--gap-ms", type=float, default=2.0,
                   help="also time the calls with this pause before each (a decode step's other work): the "
                        "threads have gone idle by then")
    p.add_argument("--chunks", default="1,2,4",
                   help="parallel region: query heads claimed together (consecutive heads share a graph)")
    p.add_argument("--cold-mib", type=int, default=512,
                   help="cold-cache rows: read this much other memory before each call, as a decode's 31 other "
                        "layers do between two searches of one layer")
    p.add_argument("--variants", default="ef=512;ef=384;ef=256;group=2,ef=384;group=2,ef=256;group=4,ef=256;"
                                          "group=4,ef=192",
                   help="search params to compare (';' between variants, ',' between params): recall@100 against "
                        "brute force, keys read, warm and cold-cache time, all threads ('' skips them)")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def median_us(fn: Callable[[], Any], reps: int, gap_s: float = 0.0, before: Callable[[], Any] | None = None
              ) -> float:
    fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def handoffs(reps: int, counts: list[int]) -> list[dict]:
    """run_claimed of an empty body (the pool's wake-up and join) and one submit/result round trip."""
    rows = [{"what": "pool submit -> result, empty task", "threads": 1,
             "us": median_us(lambda: workers.pool("search").submit(lambda: None).result(), reps)}]
    for t in counts:
        if t > 1:
            rows.append({"what": "run_claimed, empty body", "threads": t,
                         "us": median_us(lambda t=t: workers.run_claimed(lambda lo, hi: None, t, t), reps)})
    return rows


def socket_round_trip(reps: int) -> float:
    """A 64-byte request and reply between two processes over a Unix socket pair (the fast lane's transport)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # echo until the parent closes its end
        parent.close()
        while data := child.recv(64):
            child.sendall(data)
        os._exit(0)
    child.close()
    payload = b"x" * 64

    def once() -> None:
        parent.sendall(payload)
        got = 0
        while got < len(payload):
            got += len(parent.recv(64))

    us = median_us(once, reps)
    parent.close()
    os.waitpid(pid, 0)
    return us


class Layer:
    """One layer's bf16 keys, its graph (session store mode) and decode queries."""

    def __init__(self, tokens: int) -> None:
        data = qkdata.realistic(tokens, n_queries=64)
        self.keys = data.keys.to(torch.bfloat16).contiguous()
        shape = IndexShape(num_kv_heads=self.keys.shape[0], num_query_heads=data.decode_queries.shape[1],
                           head_dim=self.keys.shape[2])
        self.shape = shape
        self.stored = StoredKeys(self.keys, 0)
        topn = torch.stack([exact_topn(self.keys[h // shape.group_size].float(), data.prefill_queries[h], K)
                            for h in range(shape.num_query_heads)])
        self.index = GraphIndex(shape, {"window": "2", "enhance_ef": "0"})
        t0 = time.perf_counter()
        self.index.build(self.keys, None, BuildHints(queries=data.prefill_queries, topn_ids=topn), stored=self.stored)
        self.build_s = time.perf_counter() - t0
        # decode queries [Q, Hq, d], taken in turn: a repeated query would find its rows in the caches
        self.all_queries = data.decode_queries.float().contiguous()
        self.turn = 0
        index = self.index
        self.key_rows, self.base = index._key_rows(self.stored, index.count)
        self.key_of = np.arange(shape.num_query_heads) // shape.group_size
        self.graph_of = index._graph_of_query_head()

    def next_queries(self) -> np.ndarray:
        self.turn = (self.turn + 1) % self.all_queries.shape[0]
        return self.all_queries[self.turn].numpy()


def search_heads(layer: Layer, lo: int, hi: int, ef: int, visited: np.ndarray,
                 out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    index = layer.index
    heaps = [a[0] for a in gk.search_scratch(1, max(ef, K), index._entries.shape[1], index._adj.shape[2])]
    gk.search_rows(layer.key_rows, layer.base, index._adj, index._entries, layer.next_queries(), layer.key_of,
                   layer.graph_of, index.count, ef, 1, lo, hi, 0, *out, visited, True, 1, *heaps)


def outputs(layer: Layer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hq = layer.shape.num_query_heads
    return np.empty((hq, K), np.int64), np.empty((hq, K), np.float32), np.zeros(hq, np.int64)


def per_head_alone(layer: Layer, ef: int, reps: int) -> tuple[float, float]:
    """Median single-head search time on one thread, and the sum over all query heads (a serial call); each
    call takes the next decode query."""
    visited = np.zeros(gk.visited_words(layer.index.count), np.uint64)
    out = outputs(layer)
    per_head = []
    for h in range(layer.shape.num_query_heads):
        def one(h: int = h) -> None:
            search_heads(layer, h, h + 1, ef, visited, out)
        per_head.append(median_us(one, max(5, reps // 10)))
    return statistics.median(per_head), sum(per_head)


def per_head_concurrent(layer: Layer, ef: int, threads: int, rounds: int) -> float:
    """Median per-head search time while `threads` threads search all heads in a loop at once (no hand-offs
    inside the timing): how much concurrency alone slows a search (memory, shared caches, SMT)."""
    barrier = threading.Barrier(threads)
    times: list[float] = []
    lock = threading.Lock()
    hq = layer.shape.num_query_heads

    def worker(offset: int) -> None:
        visited = np.zeros(gk.visited_words(layer.index.count), np.uint64)
        out = outputs(layer)
        mine = []
        barrier.wait()
        for r in range(rounds):
            h = (offset + r) % hq
            t0 = time.perf_counter()
            search_heads(layer, h, h + 1, ef, visited, out)
            mine.append(time.perf_counter() - t0)
        with lock:
            times.extend(mine)

    pool = [threading.Thread(target=worker, args=(i * 7,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return statistics.median(times) * 1e6


def compare_variants(layer: Layer, spec: str, reps: int, cold: Callable[[], Any]) -> list[dict[str, Any]]:
    """Each variant's recall@K against brute force over the layer's decode queries, the keys one search reads
    (a group search's keys count once), and its time with warm and with cold caches."""
    queries = layer.all_queries  # [Q, Hq, d]
    keys = layer.keys.float()[torch.from_numpy(layer.key_of)]  # [Hq, n, d]
    truth = [torch.einsum("hd,hnd->hn", q, keys).topk(K, dim=1).indices for q in queries]
    out = []
    for text in [v for v in spec.split(";") if v.strip()]:
        params = dict(item.split("=", 1) for item in text.split(","))
        recalls, read = [], []
        for q, want in zip(queries, truth, strict=True):
            res = layer.index.search(q, K, 1.0, params, stored=layer.stored)
            recalls.append(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(res.ids, want,
                                                                                            strict=True)]))
            read.append(res.keys_touched)

        def search(params: dict[str, str] = params) -> None:
            layer.index.search(torch.from_numpy(layer.next_queries()), K, 1.0, params, stored=layer.stored)

        out.append({"params": text, "recall": float(np.mean(recalls)),
                    "keys_read_pct": 100 * float(np.mean(read)) / layer.index.count,
                    "warm_us": median_us(search, reps), "cold_us": median_us(search, reps, before=cold)})
        print(out[-1], flush=True)
    return out


def compare_huge_pages(layer: Layer, reps: int, cold: Callable[[], Any]) -> dict[str, Any]:
    """The default search with the layer's keys and graph rows in memory that asked for transparent huge pages
    (kvd.hugepages) against copies that did not, alternating, with cold caches."""
    def copy(source: torch.Tensor | np.ndarray, huge: bool) -> Any:
        target = torch.empty_like(source) if isinstance(source, torch.Tensor) else np.empty_like(source)
        if huge:
            hugepages.advise(target)
        target[...] = source
        return target

    index = layer.index
    setups = {huge: (StoredKeys(copy(layer.keys, huge), 0), copy(index._adj, huge)) for huge in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * reps):
        huge = bool(i % 2)
        stored, index._adj = setups[huge]
        query = torch.from_numpy(layer.next_queries())
        cold()
        started = time.perf_counter()
        index.search(query, K, 1.0, {"schedule": "region"}, stored=stored)
        times[huge].append(time.perf_counter() - started)
    index._adj = setups[True][1]
    return {"thp_enabled": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
            if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else "",
            "anon_huge_kib": anon_huge_kib(),
            "cold_us_4k": statistics.median(times[False]) * 1e6, "cold_us_huge": statistics.median(times[True]) * 1e6}


def anon_huge_kib() -> int:
    rollup = Path("/proc/self/smaps_rollup")
    for line in rollup.read_text().splitlines() if rollup.exists() else []:
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    counts = [int(x) for x in args.threads.split(",") if x] or sorted({t for t in (1, 2, 4, 8, 16, cores)
                                                                       if t <= cores})
    result: dict[str, Any] = {"host": platform.node(), "cores": cores, "numba": numba.__version__,
                              "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""), "gap_ms": args.gap_ms,
                              "tokens": args.tokens, "ef": args.ef, "reps": args.reps}
    rows: list[list[Any]] = []
    for r in handoffs(args.reps, counts):
        rows.append([r["what"], r["threads"], round(r["us"], 1)])
    result["handoffs"] = rows[:]
    rtt = socket_round_trip(args.reps)
    rows.append(["unix socket round trip, 64 B, two processes", 1, round(rtt, 1)])
    result["socket_rtt_us"] = rtt

    print(f"building a {args.tokens}-key layer ...", flush=True)
    layer = Layer(args.tokens)
    result["build_s"] = layer.build_s
    alone, serial = per_head_alone(layer, args.ef, args.reps)
    result["head_alone_us"], result["serial_all_heads_us"] = alone, serial
    rows.append(["graph search, one head alone", 1, round(alone, 1)])
    rows.append(["graph search, all heads one after another", 1, round(serial, 1)])
    scaling = []
    for t in counts:
        concurrent = per_head_concurrent(layer, args.ef, t, max(16, args.reps // 4))
        def pool_search(t: int = t) -> None:
            layer.index.search(torch.from_numpy(layer.next_queries()), K, 1.0, {"threads": str(t),
                               "schedule": "claim"}, stored=layer.stored)

        wall = median_us(pool_search, args.reps)
        paused = median_us(pool_search, args.reps // 2, args.gap_ms / 1000)
        scaling.append({"threads": t, "head_concurrent_us": concurrent, "pool_search_us": wall,
                        "pool_efficiency": serial / (t * wall), "pool_after_pause_us": paused})
        rows.append(["graph search, one head, all threads searching", t, round(concurrent, 1)])
        rows.append(["graph search, all heads, worker pool", t, round(wall, 1)])
        rows.append([f"graph search, all heads, worker pool, {args.gap_ms:g} ms pause before", t, round(paused, 1)])
    result["scaling"] = scaling
    if parallel.enabled():
        region = []
        for t in counts:
            def region_search(t: int = t) -> None:
                layer.index.search(torch.from_numpy(layer.next_queries()), K, 1.0, {"threads": str(t),
                                   "schedule": "region"}, stored=layer.stored)

            us = median_us(region_search, args.reps)
            paused = median_us(region_search, args.reps // 2, args.gap_ms / 1000)
            region.append({"threads": t, "us": us, "after_pause_us": paused})
            rows.append([f"graph search, all heads, parallel region ({parallel.LAYER})", t, round(us, 1)])
            rows.append([f"graph search, all heads, parallel region, {args.gap_ms:g} ms pause before", t,
                         round(paused, 1)])
        result["region"] = region
        evict = np.ones(args.cold_mib << 20, np.uint8)

        def cold() -> None:
            evict[::64].sum()  # one byte of every cache line

        chunked = []
        for chunk in [int(c) for c in args.chunks.split(",") if c]:
            def chunk_search(chunk: int = chunk) -> None:
                layer.index.search(torch.from_numpy(layer.next_queries()), K, 1.0,
                                   {"schedule": "region", "chunk": str(chunk)}, stored=layer.stored)

            us = median_us(chunk_search, max(20, args.reps // 4), before=cold)
            chunked.append({"chunk": chunk, "cold_us": us})
            rows.append([f"graph search, all heads, region, cold caches, {chunk} heads per claim", cores, round(us, 1)])
        result["cold_chunks"] = chunked
        result["huge_pages"] = huge = compare_huge_pages(layer, max(20, args.reps // 4), cold)
        rows.append([f"graph search, cold caches, keys + rows on 4 KiB pages (THP {huge['thp_enabled']})", cores,
                     round(huge["cold_us_4k"], 1)])
        rows.append([f"graph search, cold caches, keys + rows asked for huge pages ({huge['anon_huge_kib']} KiB "
                     "AnonHugePages in the process)", cores, round(huge["cold_us_huge"], 1)])
        result["variants"] = variants = compare_variants(layer, args.variants, max(20, args.reps // 4), cold)
        for v in variants:
            rows.append([f"search {v['params']}: recall@{K} {v['recall']:.3f}, {v['keys_read_pct']:.2f}% of keys "
                         f"read per search, warm / cold", cores, f"{v['warm_us']:.1f} / {v['cold_us']:.1f}"])
    else:
        rows.append(["parallel regions: no thread-safe numba threading layer here", 0, 0])

    out_dir = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else out_dir / "dispatch_bench.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}\n")
    print(markdown_table([dict(zip(("what", "threads", "us"), r, strict=True)) for r in rows],
                         [("what", "what"), ("threads", "threads"), ("us", "median us")]))


if __name__ == "__main__":
    main()
