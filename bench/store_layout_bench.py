"""Retrieval kernels on a contiguous store vs a session-like store (rows [0, n) of a larger buffer, as a layer's
store is while it has spare capacity): exact scan, scores and attention over chosen rows, candidate top-k.

    python bench/store_layout_bench.py                  # 32K keys, Llama-3-8B layer shape, bf16
    python bench/store_layout_bench.py --tokens 131072 --repeats 30

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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import markdown_table  # noqa: E402
from kvd import gather_kernels, scan_kernels  # noqa: E402


def timed(fn: Any, repeats: int) -> float:
    fn()  # compile / warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--query-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--candidates", type=int, default=512)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    hkv, hq, n, d = args.kv_heads, args.query_heads, args.tokens, args.head_dim
    buffer = torch.randn(hkv, n + n // 4, d, generator=gen).bfloat16()
    stores = {"contiguous": buffer[:, :n].contiguous(), "prefix of a larger buffer": buffer[:, :n]}
    q = torch.randn(hq, d, generator=gen)
    ids = torch.randint(0, n, (hq, args.k), generator=gen)
    scores = torch.randn(hq, args.k, generator=gen)
    candidates = torch.randint(0, n, (hq, args.candidates), generator=gen)
    rows = []
    for layout, store in stores.items():
        rows.append({
            "layout": layout,
            "exact_scan_ms": round(timed(lambda s=store: scan_kernels.scan_topk(q, s, args.k, 0, n), args.repeats), 3),
            "score_rows_ms": round(timed(lambda s=store: gather_kernels.score_rows(s, q, ids), args.repeats), 3),
            "attend_rows_ms": round(timed(lambda s=store: gather_kernels.attend_rows(s, ids, scores, 0.09),
                                          args.repeats), 3),
            "candidate_topk_ms": round(timed(lambda s=store: scan_kernels.candidate_topk(q, s, candidates, args.k,
                                                                                         0, n), args.repeats), 3),
        })
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    out = args.out or os.path.join(os.environ.get("OUT") or str(ROOT / "bench" / "results"), "store_layout_bench.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}\n")
    cols = [("layout", "store"), ("exact_scan_ms", "exact scan ms"), ("score_rows_ms", f"score {args.k} rows ms"),
            ("attend_rows_ms", f"attend {args.k} rows ms"), ("candidate_topk_ms", f"top-k of {args.candidates} ms")]
    print(markdown_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
