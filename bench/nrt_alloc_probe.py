"""Allocations made inside compiled code per decode Retrieve (numba's NRT counters): one in-process engine, an 8K
bf16 graph session of the 8B layer shape (fast-build preset), mode attention, fused region, with one RetroAttention
past query (or without: --plain). Every allocation inside a parallel region takes a heap-arena lock that the
region's threads contend for.

    NUMBA_NRT_STATS=1 python bench/nrt_alloc_probe.py [--plain] [--root TREE]   # TREE: another checkout to probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plain", action="store_true", help="no past query")
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="the kvd tree to probe")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT or bench/results, nrt_alloc_probe.json)")
    args = p.parse_args()
    if os.environ.get("NUMBA_NRT_STATS") != "1":
        raise SystemExit("set NUMBA_NRT_STATS=1 (numba counts allocations only then)")
    sys.path[:0] = [args.root, os.path.join(args.root, "client")]
    import torch
    from numba.core.runtime import rtsys

    from kvd import retro
    from kvd.config import load
    from kvd.engine import Engine
    from kvd.retrieval import Mode
    from kvd.store.session import ModelShape, SessionOptions

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n = 8192
    engine = Engine(load(overrides={"storage.data_dir": tempfile.mkdtemp(prefix="kvd-nrt-")}, environ={}))
    engine.start()
    try:
        options = SessionOptions(index_kind="graph", index_params={"window": "2", "enhance_ef": "0", "touched": "off"},
                                 sink_tokens=128, window_tokens=544)
        engine.create_session("t", "s", ModelShape(1, 8, 32, 128, torch.bfloat16), options, False)
        engine.append("t", "s", 0, [], torch.randn(1, 8, n, 128, generator=gen).bfloat16(),
                      torch.randn(1, 8, n, 128, generator=gen).bfloat16(), None,
                      torch.randn(1, 32, 256, 128, generator=gen), None)
        q = torch.randn(1, 32, 128, generator=gen)
        engine.retrieve("t", ["s"], 0, q, 100, Mode.ATTENTION, None, 0.0, False, {})
        slot = engine.session("t", "s").indexes[0]
        while not slot.ready:
            time.sleep(0.1)
        past = None if args.plain else retro.PastQueries(torch.randn(1, 1, 32, 128, generator=gen),
                                                         torch.full((1, 1, 32, 100), -1, dtype=torch.int64), None,
                                                         True)

        def call() -> None:
            results, _, _ = engine.retrieve("t", ["s"], 0, q, 100, Mode.ATTENTION, None, 0.0, False, {}, past=past)
            assert results[0].index_kind == "graph" and results[0].attend_s == 0.0  # the fused region served it

        for _ in range(4):
            call()
        before = rtsys.get_allocation_stats()
        for _ in range(args.calls):
            call()
        after = rtsys.get_allocation_stats()
        row = {"tree": args.root, "past_queries": 0 if args.plain else 1,
               "nrt_allocations_per_call": (after.alloc - before.alloc) / args.calls, "calls": args.calls}
    finally:
        engine.close()
    out = Path(args.out or os.path.join(os.environ.get("OUT") or Path(__file__).resolve().parent / "results",
                                        "nrt_alloc_probe.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": [row]}, indent=1))
    print(f"wrote {out}\n")
    print("tree | past queries | NRT allocations per call\n--- | --- | ---")
    print(f"{row['tree']} | {row['past_queries']} | {row['nrt_allocations_per_call']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
