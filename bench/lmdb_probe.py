"""How fast can LMDB write and read large K/V records on this host, per environment mode? Writes `--gib` GiB in
16 MiB records (one transaction per 256 MiB) under each mode, then reads them back in parallel threads.
Prints a table last and writes JSON. Used to choose the disk tier's LMDB flags."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb

RECORD = 16 << 20
MODES = {
    "sync": {"sync": True, "writemap": False},
    "sync+writemap": {"sync": True, "writemap": True},
    "nosync": {"sync": False, "writemap": False},
}


def run(mode: str, flags: dict, gib: float, base: Path, readahead: bool) -> dict:
    path = base / mode
    env = lmdb.open(str(path), map_size=int(gib * 2**31) + (1 << 30), readahead=readahead, **flags)
    payload = os.urandom(RECORD)
    count = int(gib * 2**30 // RECORD)
    started = time.perf_counter()
    for first in range(0, count, 16):
        with env.begin(write=True) as txn:
            for i in range(first, min(count, first + 16)):
                txn.put(i.to_bytes(8, "big"), payload)
    env.sync(True)
    write_s = time.perf_counter() - started
    env.close()
    for name in os.listdir(path):
        fd = os.open(path / name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    env = lmdb.open(str(path), readahead=readahead, readonly=True, lock=False)

    def read(i: int) -> int:
        with env.begin(buffers=True) as txn:
            return len(bytes(txn.get(i.to_bytes(8, "big"))))

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        total = sum(pool.map(read, range(count)))
    read_s = time.perf_counter() - started
    env.close()
    shutil.rmtree(path)
    return {"mode": mode, "readahead": readahead, "gib": gib, "write_gbps": count * RECORD / write_s / 1e9,
            "read_gbps": total / read_s / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("KVD_BENCH_TMP")) as tmp:
        for mode, flags in MODES.items():
            for readahead in (False, True):
                rows.append(run(mode, flags, args.gib, Path(tmp), readahead))
                print(rows[-1], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "lmdb_probe.json").write_text(json.dumps(rows, indent=1))
    print(f"{'mode':15s} {'readahead':>9s} {'write GB/s':>10s} {'cold read GB/s':>14s}")
    for r in rows:
        print(f"{r['mode']:15s} {r['readahead']!s:>9s} {r['write_gbps']:10.2f} {r['read_gbps']:14.2f}")


if __name__ == "__main__":
    main()
