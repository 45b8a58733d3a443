"""Disk-tier benchmark: spill and promote throughput, persist latency, and restore-to-first-retrieve of an
8B-shaped session (32 layers x 8 KV heads x 128 head dim, bf16: 128 KiB of KV per token).

    python bench/tier_bench.py --tokens 16384            # 2-core machine (2 GiB session)
    python bench/tier_bench.py --tokens 131072 --out $OUT # GPU host (16 GiB session)

Phases: (1) in-process engine: spill() a session to LMDB and promote() it back, timed; (2) the real daemon:
append over shared memory, Persist, restart (SIGTERM, start), drop the LMDB file from the page cache
(posix_fadvise DONTNEED: a cold read), and time the first Retrieve, which promotes the session.
Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS, KV_HEADS, HEADS, DIM = 32, 8, 32, 128
PREFILL_H100_128K_S = 22.31   # ../shared/baselines/h100_full_attention_transformers.json


def progress(message: str) -> None:
    print(f"[tier_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synthetic_layer(layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(layer)
    keys = torch.randn(KV_HEADS, tokens, DIM, generator=g, dtype=torch.float32).to(torch.bfloat16)
    return keys, keys.flip(1)


def drop_page_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def in_process(tokens: int, workdir: Path) -> dict:
    from kvd.config import load
    from kvd.engine import Engine
    from kvd.store.session import ModelShape, SessionOptions

    config = load(overrides={"storage.data_dir": str(workdir / "engine"), "storage.lmdb_map_size": "4GiB"},
                  environ={})
    engine = Engine(config)
    engine.start()
    shape = ModelShape(LAYERS, KV_HEADS, HEADS, DIM, torch.bfloat16)
    engine.create_session("default", "bench", shape, SessionOptions(), False)
    for layer in range(LAYERS):
        keys, values = synthetic_layer(layer, tokens)
        engine.append("default", "bench", 0, [layer], keys.unsqueeze(0), values.unsqueeze(0), None, None, None)
    session = engine.session("default", "bench")
    nbytes = session.kv_bytes
    progress(f"in-process: spilling {nbytes / 2**30:.2f} GiB")
    started = time.perf_counter()
    engine.tiering.spill(session)
    spill_s = time.perf_counter() - started
    warm_started = time.perf_counter()
    engine.tiering.promote(session)
    promote_warm_s = time.perf_counter() - warm_started
    engine.tiering.spill(session)
    cold = drop_page_cache(engine.tiering.store.path / "data.mdb")
    started = time.perf_counter()
    engine.tiering.promote(session)
    promote_cold_s = time.perf_counter() - started
    engine.close()
    shutil.rmtree(workdir / "engine", ignore_errors=True)
    return {"session_bytes": nbytes, "spill_s": spill_s, "spill_gbps": nbytes / spill_s / 1e9,
            "promote_page_cache_s": promote_warm_s, "promote_page_cache_gbps": nbytes / promote_warm_s / 1e9,
            "promote_cold_s": promote_cold_s, "promote_cold_gbps": nbytes / promote_cold_s / 1e9,
            "cold_cache_dropped": cold}


def through_daemon(tokens: int, workdir: Path) -> dict:
    from tests.conftest import DaemonProcess

    daemon = DaemonProcess(workdir / "daemon", ["--set", "storage.lmdb_map_size=4GiB"], tcp=False)
    daemon.workdir.mkdir(parents=True, exist_ok=True)
    daemon.start()
    client = daemon.client()
    client.create_session("chat", num_layers=LAYERS, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM,
                          dtype="bf16", sink_tokens=128, window_tokens=512)
    progress("daemon: appending")
    append_s = 0.0
    for layer in range(LAYERS):
        keys, values = synthetic_layer(layer, tokens)
        started = time.perf_counter()
        client.append("chat", 0, keys, values, layers=[layer])
        append_s += time.perf_counter() - started
    nbytes = LAYERS * 2 * KV_HEADS * tokens * DIM * 2
    progress("daemon: persisting")
    started = time.perf_counter()
    client.persist("chat")
    persist_s = time.perf_counter() - started
    client.close()
    daemon.stop()
    cold = drop_page_cache(Path(daemon.data_dir) / "kvd.lmdb" / "data.mdb")
    restart_started = time.perf_counter()
    daemon.start()
    ready_s = time.perf_counter() - restart_started
    client = daemon.client()
    query = torch.randn(HEADS, DIM)
    started = time.perf_counter()
    first = client.retrieve("chat", 0, query, k=100)
    first_retrieve_s = time.perf_counter() - started
    started = time.perf_counter()
    client.retrieve("chat", 1, query, k=100)
    second_retrieve_s = time.perf_counter() - started
    client.close()
    daemon.stop()
    restore_s = ready_s + first_retrieve_s
    return {"session_bytes": nbytes, "append_gbps": nbytes / append_s / 1e9, "persist_s": persist_s,
            "persist_gbps": nbytes / persist_s / 1e9, "daemon_ready_s": ready_s,
            "first_retrieve_s": first_retrieve_s, "first_retrieve_promoted": first.promoted[0],
            "restore_to_first_retrieve_s": restore_s, "next_retrieve_ms": second_retrieve_s * 1000,
            "cold_cache_dropped": cold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVD_BENCH_TMP")) as tmp:
        engine = in_process(args.tokens, Path(tmp))
        daemon = through_daemon(args.tokens, Path(tmp))
    prefill_estimate = PREFILL_H100_128K_S * (args.tokens / 131072) ** 2 if args.tokens != 131072 \
        else PREFILL_H100_128K_S
    result = {"tokens": args.tokens, "shape": f"{LAYERS}x{KV_HEADS}x{DIM} bf16", "host": platform.node(),
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "engine": engine, "daemon": daemon,
              "h100_prefill_s_reference": PREFILL_H100_128K_S,
              "restore_speedup_vs_h100_prefill_128k": PREFILL_H100_128K_S / daemon["restore_to_first_retrieve_s"],
              "note": "prefill reference is the 128K H100 figure; only comparable at --tokens 131072",
              "prefill_estimate_s_at_this_length_quadratic": prefill_estimate}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tier_bench_{args.tokens}{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    gib = engine["session_bytes"] / 2**30
    rows = [
        ("session size", f"{gib:.2f} GiB ({args.tokens} tokens)"),
        ("spill (engine)", f"{engine['spill_gbps']:.2f} GB/s ({engine['spill_s']:.2f} s)"),
        ("promote, page cache (engine)", f"{engine['promote_page_cache_gbps']:.2f} GB/s"),
        ("promote, cold (engine)",
         f"{engine['promote_cold_gbps']:.2f} GB/s (cache dropped: {engine['cold_cache_dropped']})"),
        ("append over shm (daemon)", f"{daemon['append_gbps']:.2f} GB/s"),
        ("persist (daemon)", f"{daemon['persist_s']:.2f} s ({daemon['persist_gbps']:.2f} GB/s)"),
        ("daemon restart to ready", f"{daemon['daemon_ready_s']:.2f} s"),
        ("first retrieve (promotes)", f"{daemon['first_retrieve_s']:.2f} s"),
        ("restore to first retrieve", f"{daemon['restore_to_first_retrieve_s']:.2f} s"),
        ("next retrieve", f"{daemon['next_retrieve_ms']:.1f} ms"),
        ("vs H100 128K prefill 22.3 s", f"{result['restore_speedup_vs_h100_prefill_128k']:.1f}x"),
    ]
    print(f"\nwrote {path}")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
