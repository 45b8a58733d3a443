"""Does this host give a process transparent huge pages, and would they speed up kvd's random row reads?

A decode Retrieve reads a few thousand scattered 256-byte key rows of a layer store (256 MiB per layer at 128K
tokens for 8 KV heads, 4 GiB for 32 layers): with 4 KiB pages nearly every row read also misses the TLB. This
probe allocates anonymous memory with and without madvise(MADV_HUGEPAGE) and times, per row:
- `independent`: reads of random rows whose addresses are all known up front (the loads overlap, like the
  graph search's prefetched neighbour rows);
- `chained`: each row's address depends on the previous read (no overlap, like a beam search's next expansion).

    python bench/hugepage_probe.py                      # 256 MiB and 4 GiB
    python bench/hugepage_probe.py --sizes-mib 256

Prints the host's THP settings and the AnonHugePages the allocations got; a table last; JSON to $OUT (if set) or
bench/results/.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402

MADV_HUGEPAGE = 14
ROW_BYTES = 256
HUGE = 2 << 20


def thp_setting(name: str) -> str:
    try:
        return Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


def anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines() if Path("/proc/self/smaps_rollup").exists() \
            else []:
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def allocate(nbytes: int, huge: bool) -> tuple[mmap.mmap, np.ndarray, int]:
    """Anonymous memory, 2 MiB aligned, optionally madvise(MADV_HUGEPAGE), written once; (map, bytes, madvise rc)."""
    region = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(region, dtype=np.uint8)
    offset = (-raw.ctypes.data) % HUGE
    rc = 0
    if huge:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        rc = libc.madvise(ctypes.c_void_p(raw.ctypes.data + offset), ctypes.c_size_t(nbytes), MADV_HUGEPAGE)
        rc = 0 if rc == 0 else ctypes.get_errno()
    data = raw[offset:offset + nbytes]
    data[:] = 1
    return region, data, rc


@njit(cache=True)
def _independent(rows: np.ndarray, order: np.ndarray) -> float:
    total = 0.0
    for i in order:
        row = rows[i]
        total += row[0] + row[32] + row[64] + row[96]  # one read per 64-byte line of the row
    return total


@njit(cache=True)
def _chained(rows: np.ndarray, order: np.ndarray, count: int) -> int:
    at = 0
    for _ in range(count):
        row = rows[order[at]]
        at = (at + 1 + (row[0] + row[32] + row[64] + row[96]) % 3) % order.shape[0]  # depends on the read
    return at


def probe(size_mib: int, huge: bool, reads: int) -> dict[str, Any]:
    region, data, rc = allocate(size_mib << 20, huge)
    rows = data.view(np.uint16).reshape(-1, ROW_BYTES // 2)
    order = np.random.default_rng(0).integers(0, rows.shape[0], reads)
    _independent(rows, order[:16])
    _chained(rows, order[:16], 16)
    started = time.perf_counter()
    _independent(rows, order)
    independent = time.perf_counter() - started
    started = time.perf_counter()
    _chained(rows, order, reads)
    chained = time.perf_counter() - started
    result = {"size_mib": size_mib, "madvise_hugepage": huge, "madvise_errno": rc, "anon_huge_kib": anon_huge_kib(),
              "independent_ns_per_row": round(1e9 * independent / reads, 1),
              "chained_ns_per_row": round(1e9 * chained / reads, 1)}
    del rows, data
    region.close()
    print(result, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", default="256,4096")
    p.add_argument("--reads", type=int, default=400_000)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    settings = {"enabled": thp_setting("enabled"), "defrag": thp_setting("defrag")}
    print(f"transparent huge pages: {settings}", flush=True)
    rows = [probe(int(size), huge, args.reads) for size in args.sizes_mib.split(",") if size
            for huge in (False, True, False, True)]
    result = {"host": platform.node(), "cores": os.cpu_count(), "thp": settings, "rows": rows}
    out_dir = Path(os.environ.get("OUT", ROOT / "bench" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else out_dir / "hugepage_probe.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}\n")
    print(markdown_table(rows, [("size_mib", "MiB"), ("madvise_hugepage", "MADV_HUGEPAGE"),
                                ("anon_huge_kib", "AnonHugePages KiB"),
                                ("independent_ns_per_row", "independent ns/row"),
                                ("chained_ns_per_row", "chained ns/row")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
