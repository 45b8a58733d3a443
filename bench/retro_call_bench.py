"""Per-call cost of RetroAttention's past queries (issue 6): decode-shaped Retrieve calls through a daemon with
and without P past queries, interleaved.

One bf16 session of the 8B layer shape (8 KV / 32 query heads, head dim 128), --tokens keys per layer, k=100,
partial attention over the offloaded range (sink 128, window 544 excluded), flat exact index (--index graph: the
graph's fused region). Each call goes to
a layer that was not touched for a while (calls cycle over --layers, as the decode does), so the retrieved rows
miss the caches as they do in a decode. Past queries are random, their seen ids the previous call's retrieval
(so nearly every retrieved key is new to them, as with random weights). Reports medians of the call, of its
server time (RetrieveResponse.server_ms), and the paired extra of each past count over the plain call.

    python bench/retro_call_bench.py                          # starts its own daemon (bench/daemon.py)
    python bench/retro_call_bench.py --layers 1 --past 1,3,7
    KVD_RETRO_THREADS=1 python bench/retro_call_bench.py   # the daemon's fused kernel on one thread (default:
                                                           # up to half the cores, kvd.retro.max_threads)
    python bench/retro_call_bench.py --compare-target unix:///tmp/before.sock   # A/B against another tree
    python bench/retro_call_bench.py --prepared            # A/B: ordinary calls against prepared plans' runs
    python bench/retro_call_bench.py --kernel 1,2,4,6       # in-process: the fused kernel alone on 1, 2, 4, 6
                                                           # threads vs gather_kernels.attend_rows (no daemon)
    python bench/retro_call_bench.py --transport             # in-process: the Python of encoding, parsing,
                                                           # replying and decoding one call (P=1), plain vs past
                                                           # queries in their own fields vs stacked + packed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT / "client", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from kvd_client import KvdClient  # noqa: E402

from bench.common import spin  # noqa: E402
from bench.daemon import Daemon  # noqa: E402

KV_HEADS, HEADS, DIM, K, SINK, WINDOW = 8, 32, 128, 100, 128, 544


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="keys per layer")
    p.add_argument("--layers", type=int, default=32, help="layers the calls cycle over")
    p.add_argument("--past", default="1,3", help="comma-separated past-query counts P to compare with P=0")
    p.add_argument("--calls", type=int, default=200, help="timed calls per variant")
    p.add_argument("--warmup", type=float, default=15.0,
                   help="seconds of untimed calls first (a fresh daemon compiles its kernels in the background)")
    p.add_argument("--target", default=None, help="an existing daemon; default: start one")
    p.add_argument("--compare-target", default=None,
                   help="a second daemon (e.g. `python -m kvd serve --socket ...` from another checkout) given the "
                        "same calls, interleaved: an A/B of two trees on one loaded machine")
    p.add_argument("--kernel", default=None,
                   help="comma-separated thread counts: time kvd.retro.attend_rows_past in-process instead")
    p.add_argument("--seen-overlap", type=float, default=0.0,
                   help="--kernel: the fraction of each call's retrieved keys that the past queries saw already "
                        "(0: the previous call's random keys, nearly all new, as with random weights; a trained "
                        "model's consecutive steps retrieve mostly the same keys)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for the packed reply (RetrieveResult.packed), as the integration does")
    p.add_argument("--stacked", action=argparse.BooleanOptionalAction, default=True,
                   help="send the past queries stacked in the queries tensor (past_in_queries), as the integration "
                        "does")
    p.add_argument("--index", default="flat", choices=("flat", "graph"),
                   help="the session's index: graph (fast-build preset, from random hints) serves the calls with "
                        "the fused search-and-attention region, past queries inside it")
    p.add_argument("--graph-threads", type=int, default=0,
                   help="with --index graph: threads of its region (0 = one per core; more than the cores, with "
                        "the daemon's server.region_threads raised too, emulates a many-core host's contention)")
    p.add_argument("--prepared", action="store_true",
                   help="also time every call as a run of a prepared plan (KvdClient.prepare_retrieve), interleaved "
                        "with the ordinary calls (needs --stacked and --packed, the defaults)")
    p.add_argument("--transport", action="store_true",
                   help="time the transport steps of one call in-process instead (no daemon)")
    p.add_argument("--busy", type=int, default=0,
                   help="processes that spin on a core each while the calls are timed (a busy host: the region's "
                        "threads share the cores, as beside a GPU process's launching thread)")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/retro_call_bench.json if OUT is set)")
    return p.parse_args(argv)


class PlanCaller:
    """retrieve() made through prepared plans (KvdClient.prepare_retrieve), one per past count, as KVDCache
    decodes: the inputs written into the plan's shared memory, then a run."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.plans: dict[int, Any] = {}

    def retrieve(self, session_ids: list[str], layer: int, *, k: int, ranges: Any, queries: torch.Tensor,
                 past_in_queries: int = 0, past_seen_ids: Any = None, past_seen_from: Any = None, **_: Any) -> Any:
        count = past_in_queries
        plan = self.plans.get(count)
        if plan is None:
            seen = 0 if past_seen_ids is None else past_seen_ids.shape[-1]
            plan = self.plans[count] = self.client.prepare_retrieve(session_ids, k=k, past=count, seen=seen)
        plan.queries.copy_(queries)
        if count:
            if plan.seen_ids is not None:
                plan.seen_ids.copy_(past_seen_ids)
            plan.seen_from.copy_(past_seen_from)
        return plan.run(layer, ranges)

    def close(self) -> None:
        for plan in self.plans.values():
            plan.close()


def fill(client: Any, args: argparse.Namespace, sid: str) -> None:
    gen = torch.Generator().manual_seed(0)
    client.create_session(sid, num_layers=args.layers, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM,
                          dtype=torch.bfloat16, index=args.index, sink_tokens=SINK, window_tokens=WINDOW,
                          index_params={"window": 2, "enhance_ef": 0, "threads": args.graph_threads}
                          if args.index == "graph" else None)
    step = 2048
    for a in range(0, args.tokens, step):
        n = min(step, args.tokens - a)
        keys = torch.randn(args.layers, KV_HEADS, n, DIM, generator=gen).bfloat16()
        values = torch.randn(args.layers, KV_HEADS, n, DIM, generator=gen).bfloat16()
        hints = torch.randn(args.layers, HEADS, 256, DIM, generator=gen) if a + n >= args.tokens else None
        client.append(sid, a, keys, values, hint_queries=hints if args.index == "graph" else None)
    if args.index == "graph":  # served exactly until built: wait for every layer's graph
        deadline = time.perf_counter() + 900
        while not all(i.get("ready") for i in client.get_session(sid).indexes) \
                or len(client.get_session(sid).indexes) < args.layers:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"graphs of {sid} not ready")
            time.sleep(0.5)


def measure(clients: dict[str, Any], args: argparse.Namespace, sid: str, counts: list[int]
            ) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Timed calls per daemon (label) and past count, all daemons and counts interleaved with the same inputs."""
    gen = torch.Generator().manual_seed(1)
    ranges = [(SINK, args.tokens - WINDOW)]
    got = {name: {p: {"call_ms": [], "server_ms": [], "outside_ms": []} for p in counts} for name in clients}
    first = next(iter(clients.values()))
    prev = first.retrieve([sid], 0, torch.randn(1, HEADS, DIM, generator=gen), k=K, ranges=ranges)
    slot, i, timed_from, started_all = 0, 0, None, time.perf_counter()
    order = [(name, p) for name in clients for p in counts]
    while timed_from is None or i < timed_from + args.calls:
        if timed_from is None and time.perf_counter() - started_all >= args.warmup:
            timed_from = i
        query = torch.randn(1, HEADS, DIM, generator=gen)
        pasts: dict[int, dict[str, Any]] = {0: {"queries": query}}
        for p in counts[1:]:
            past_q = torch.randn(1, p, HEADS, DIM, generator=gen)
            pasts[p] = {"past_seen_ids": prev.ids.unsqueeze(1).expand(1, p, HEADS, K),
                        "past_seen_from": torch.full((1, p), args.tokens - WINDOW, dtype=torch.int64),
                        "packed": args.packed}
            if args.stacked:
                pasts[p].update(queries=torch.cat([past_q, query.unsqueeze(1)], dim=1), past_in_queries=p)
            else:
                pasts[p].update(queries=query, past_queries=past_q)
        for name, p in (order if i % 2 else order[::-1]):
            slot += 1  # every call to another layer: its rows are cold
            started = time.perf_counter()
            res = clients[name].retrieve([sid], slot % args.layers, k=K, ranges=ranges, **pasts[p])
            took = 1000 * (time.perf_counter() - started)
            if timed_from is not None:
                got[name][p]["call_ms"].append(took)
                got[name][p]["server_ms"].append(res.server_ms)
                # the daemon's time outside its compiled regions: its Python around the kernels
                got[name][p]["outside_ms"].append(res.server_ms - res.search_kernel_ms - res.attend_kernel_ms)
            if p == 0 and name == next(iter(clients)):
                prev = res
        i += 1
    return got


def summary(got: dict[int, dict[str, list[float]]]) -> list[dict[str, Any]]:
    base = got[0]
    rows = []
    for p, times in got.items():
        row: dict[str, Any] = {"past": p, **{key: round(statistics.median(times[key]), 3)
                                             for key in ("call_ms", "server_ms", "outside_ms")}}
        if p:
            for key in ("call_ms", "server_ms", "outside_ms"):
                row[f"extra_{key}"] = round(statistics.median(b - a for a, b in zip(base[key], times[key],
                                                                                   strict=True)), 3)
        rows.append(row)
    return rows


def kernel(args: argparse.Namespace, counts: list[int]) -> list[dict[str, Any]]:
    """The fused kernel in-process on the same shapes (rows cold: the calls cycle over --layers stores; key rows
    scored just before, as the search does), interleaved with gather_kernels.attend_rows (the plain call's)."""
    from kvd import gather_kernels, retro

    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(KV_HEADS, args.tokens, DIM, generator=gen).bfloat16() for _ in range(args.layers)]
    values = [torch.randn(KV_HEADS, args.tokens, DIM, generator=gen).bfloat16() for _ in range(args.layers)]
    retro.warmup()
    variants = [(0, 1)] + [(p, int(t)) for p in counts if p for t in args.kernel.split(",")]
    times: dict[tuple[int, int], list[float]] = {v: [] for v in variants}
    prev = None
    for i in range(args.calls * len(variants)):
        layer = i % args.layers
        ids = torch.stack([torch.randperm(args.tokens - SINK - WINDOW, generator=gen)[:K] + SINK
                           for _ in range(HEADS)])
        scores = gather_kernels.score_rows(keys[layer], torch.randn(HEADS, DIM, generator=gen), ids)
        p, threads = variants[i % len(variants)]
        seen_before = round(args.seen_overlap * K)  # of this call's keys, the past queries saw these already
        seen = torch.cat([ids[:, :seen_before], (ids if prev is None else prev)[:, seen_before:]], dim=1)
        seen = seen.unsqueeze(0).expand(p, HEADS, K).contiguous()
        past = retro.PastQueries(torch.randn(p, HEADS, DIM, generator=gen), seen,
                                 torch.full((p,), args.tokens - WINDOW))
        started = time.perf_counter()
        if p == 0:
            gather_kernels.attend_rows(values[layer], ids, scores, 0.088)
        else:
            retro.attend_rows_past(keys[layer], values[layer], ids, scores, 0.088, past, threads=threads)
        times[(p, threads)].append(1000 * (time.perf_counter() - started))
        prev = ids
    return [{"past": p, "threads": t, "kernel_ms": round(statistics.median(v), 3)} for (p, t), v in times.items()]


def transport(reps: int = 3000) -> list[dict[str, Any]]:
    """Median microseconds of each transport step of one decode-shaped call (one sequence, P=1, k=100), in-process
    on a shared-memory region: the client's request encoding, the daemon's parse and checks of the past queries,
    the daemon's reply, the client's decoding; for the plain call, past queries in their own fields with four
    reply tensors, and the integration's form (stacked in the queries tensor, packed reply)."""
    from kvd_client import calls
    from kvd_client.shm import ShmRegion
    from kvd_client.transport import Placer

    from kvd import retro
    from kvd.convert import TensorCodec
    from kvd.retrieval import SequenceResult
    from kvd.v1 import kvd_pb2 as pb

    class Registry:  # the daemon's SharedMemoryRegistry, reduced to the one region
        def __init__(self, region: ShmRegion) -> None:
            self.region = region

        def slice(self, tenant: str, name: str, offset: int, size: int) -> memoryview:
            return self.region.buffer[offset:offset + size]

    region = ShmRegion.create(16 << 20)
    codec = TensorCodec(Registry(region), "bench")  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    query, past_q = torch.randn(1, HEADS, DIM, generator=gen), torch.randn(1, 1, HEADS, DIM, generator=gen)
    seen = torch.randint(0, 8000, (1, 1, HEADS, K), generator=gen)
    ranges = [(SINK, 8192 - WINDOW)]
    kinds = ("plain", "fields", "stacked_packed")

    def encode(kind: str) -> bytes:
        placer = Placer(region, region.key)
        if kind == "plain":
            request = calls.retrieve_request(placer, ["s"], 0, query, K, "attention", ranges, 0.088, False, None)
        elif kind == "fields":
            request = calls.retrieve_request(placer, ["s"], 0, query, K, "attention", ranges, 0.088, False, None,
                                             calls.normalize_past(False, past_q, seen, None))
        else:
            request = calls.retrieve_request(placer, ["s"], 0, torch.cat([past_q, query.unsqueeze(1)], dim=1), K,
                                             "attention", ranges, 0.088, False, None,
                                             calls.normalize_past(False, None, seen, None, stacked=1), True, 1)
        return request.SerializeToString()

    def parse(raw: bytes) -> None:
        request = pb.RetrieveRequest.FromString(raw)
        queries = codec.read(request.queries, "queries")
        if request.HasField("past"):
            _, past = retro.past_from_wire(codec, request.past, queries)
            retro.check_past(past, 1, HEADS, DIM)

    store = torch.randn(KV_HEADS, 1000, DIM, generator=gen).bfloat16()
    ids = torch.randint(0, 1000, (HEADS, K), generator=gen)
    result = SequenceResult(ids=ids, count=K, index_kind="flat")
    result.output, result.lse, result.past_output, result.past_lse = retro.attend_rows_past(
        store, store, ids, torch.randn(HEADS, K, generator=gen), 0.088, retro.PastQueries(past_q[0], None, None),
        threads=1)

    def reply(kind: str) -> bytes:
        message = pb.RetrieveResponse(counts=[K])
        writer = codec.writer(pb.SharedMemoryRef(region=region.key, offset=1 << 20, byte_size=1 << 20), True)
        codec.write(writer, torch.stack([result.ids]), message.ids)
        if kind == "stacked_packed":
            retro.write_packed(codec, writer, [result], message)
        else:
            codec.write(writer, torch.stack([result.output]), message.output)  # type: ignore[misc]
            codec.write(writer, torch.stack([result.lse]), message.lse)  # type: ignore[misc]
            if kind == "fields":
                retro.write_past(codec, writer, [result], message)
        return message.SerializeToString()

    def decode(raw: bytes) -> None:
        calls.retrieve_result(pb.RetrieveResponse.FromString(raw), Placer(region, region.key), False)

    def medians_us(fns: list[Any]) -> list[float]:
        """The steps of the forms timed in turn (a load that changes during the run hits them alike)."""
        times: list[list[float]] = [[] for _ in fns]
        for rep in range(reps + reps // 10):
            for fn, got in zip(fns, times, strict=True):
                started = time.perf_counter()
                fn()
                if rep >= reps // 10:
                    got.append(time.perf_counter() - started)
        return [round(1e6 * statistics.median(got), 1) for got in times]

    try:
        raws = {kind: encode(kind) for kind in kinds}
        answers = {kind: reply(kind) for kind in kinds}
        steps = {"client_encode_us": [lambda kind=kind: encode(kind) for kind in kinds],
                 "daemon_parse_us": [lambda kind=kind: parse(raws[kind]) for kind in kinds],
                 "daemon_reply_us": [lambda kind=kind: reply(kind) for kind in kinds],
                 "client_decode_us": [lambda kind=kind: decode(answers[kind]) for kind in kinds]}
        rows: list[dict[str, Any]] = [{"form": kind} for kind in kinds]
        for step, fns in steps.items():
            for row, value in zip(rows, medians_us(fns), strict=True):
                row[step] = value
    finally:
        region.close()
    for row in rows:
        row["total_us"] = round(sum(v for k, v in row.items() if k.endswith("_us")), 1)
    for row in rows[1:]:
        row["extra_over_plain_us"] = round(row["total_us"] - rows[0]["total_us"], 1)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepared and not (args.stacked and args.packed):
        raise SystemExit("--prepared needs --stacked and --packed: plans send past queries stacked, packed")
    counts = [0, *(int(p) for p in args.past.split(",") if p)]
    if args.transport:
        rows = transport()
        for row in rows:
            print(json.dumps(row))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows},
                                                 indent=1))
        return 0
    if args.kernel:
        rows = kernel(args, counts)
        for row in rows:
            print(f"P={row['past']} threads={row['threads']}: {row['kernel_ms']} ms"
                  + (" (gather_kernels.attend_rows)" if row["past"] == 0 else ""))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "cpu_count": os.cpu_count(), "rows": rows},
                                                 indent=1))
        return 0
    daemon = None if args.target else Daemon()
    clients: dict[str, Any] = {}
    try:
        clients["this"] = KvdClient(args.target or daemon.target)  # type: ignore[union-attr]
        if args.compare_target:
            clients["compared"] = KvdClient(args.compare_target)
        sid = "retro-call-bench"
        for client in clients.values():
            fill(client, args, sid)
        if args.prepared:
            clients["prepared"] = PlanCaller(clients["this"])
            if args.compare_target:
                clients["prepared compared"] = PlanCaller(clients["compared"])
        spinners = spin(args.busy)
        try:
            got = measure(clients, args, sid, counts)
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait()
        rows = [{"daemon": name, **row} for name, times in got.items() for row in summary(times)]
        if len(clients) == 1:
            rows = [{k: v for k, v in row.items() if k != "daemon"} for row in rows]
        for name, client in reversed(clients.items()):
            if not name.startswith("prepared"):
                client.delete_session(sid)
            client.close()
    finally:
        if daemon is not None:
            daemon.stop()
    result = {"args": vars(args), "cpu_count": os.cpu_count(),
              "retro_threads_env": os.environ.get("KVD_RETRO_THREADS", ""), "rows": rows}
    out = args.out or (os.path.join(os.environ["OUT"], "retro_call_bench.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    for row in rows:
        extra = (f", extra {row['extra_call_ms']} ms (server {row['extra_server_ms']} ms, outside the kernels "
                 f"{row['extra_outside_ms']} ms)" if row["past"] else "")
        label = f"{row['daemon']} " if "daemon" in row else ""
        print(f"{label}P={row['past']}: call {row['call_ms']} ms (server {row['server_ms']} ms, outside the kernels "
              f"{row['outside_ms']} ms){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
