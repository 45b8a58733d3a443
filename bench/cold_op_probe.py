"""What one small torch / numpy op costs right after a parallel region, against the same op again at once.

Why: in a decode Retrieve the daemon's Python between its kernels (tensor wrappers, an index shift, a count)
took several times its idle cost on the H100 host, and it did not shrink when the search did less work
(BENCHMARKS.md, seventh session). This probe shows the effect alone: a numba parallel region reads `--mib` of
memory `--reps` times (as a search reads key rows), then a few ops of the kind the Retrieve path makes are
timed, each twice in a row. The first of each kind pays for code and data the region evicted; the repeat does
not. Every op removed from the path after a kernel saves about its first-call cost.

    python bench/cold_op_probe.py                     # 64 MiB read once per region
    python bench/cold_op_probe.py --mib 1 --reps 40   # a region that evicts little

Prints a table last; writes JSON to $OUT (if set) or bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit, prange

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402
from kvd import parallel  # noqa: E402  (selects numba's thread-safe layer, as the daemon does)


@njit(parallel=True, nogil=True)
def _read_rows(buffer: np.ndarray, reps: int, out: np.ndarray) -> None:
    for row in prange(buffer.shape[0]):
        acc = 0.0
        for _ in range(reps):
            for j in range(buffer.shape[1]):
                acc += buffer[row, j]
        out[row] = acc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=64.0, help="memory the region reads")
    p.add_argument("--reps", type=int, default=1, help="times the region reads it")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = 64
    buffer = np.random.default_rng(0).random((rows, max(1, int(args.mib * 2**20 / 8 / rows))))
    region_out = np.empty(rows)
    ids = np.full((32, 100), -1, np.int64)
    touched = np.zeros(32, np.int64)
    local = torch.from_numpy(ids.copy())
    ops = {  # the kinds of op a Retrieve makes between its kernels
        "torch.from_numpy": lambda: torch.from_numpy(ids),
        "numpy sum": lambda: int(touched.sum()),
        "torch.where (shift ids)": lambda: torch.where(local >= 0, local + 5, local),
        "np.empty": lambda: np.empty((32, 100), np.float32),
    }
    _read_rows(buffer, 1, region_out)
    times: dict[str, list[list[float]]] = {name: [[], []] for name in ops}
    for _ in range(args.rounds):
        _read_rows(buffer, args.reps, region_out)
        for name, op in ops.items():
            for second in (0, 1):
                started = time.perf_counter()
                op()
                times[name][second].append(time.perf_counter() - started)
    rows_out: list[dict[str, Any]] = []
    for name, (first, again) in times.items():
        rows_out.append({"op": name, "first_us": round(1e6 * statistics.median(first), 1),
                         "again_us": round(1e6 * statistics.median(again), 1)})
    meta = {"host": platform.node(), "cores": os.cpu_count(), "threading_layer": parallel.LAYER,
            "region_mib": args.mib, "reps": args.reps, "rounds": args.rounds}
    out = Path(args.out or os.path.join(os.environ.get("OUT") or ROOT / "bench" / "results", "cold_op_probe.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    print(f"wrote {out}\n")
    print(markdown_table(rows_out, [("op", "op (each timed twice in a row after a region)"),
                                    ("first_us", "first, median us"), ("again_us", "again, median us")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
