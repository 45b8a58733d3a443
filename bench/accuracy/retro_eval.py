"""RetroAttention on the trained accuracy model: task accuracy through kvd with and without retrospective
correction, at equal retrieval budget (same index, k, sink and window), against full attention (issue 6).

    python bench/accuracy/retro_eval.py                                 # graph index, 4K and 8K, w = 1, 2, 4
    python bench/accuracy/retro_eval.py --lengths 2048 --items 4 --windows 1,2   # a quick CPU check

Each item is decoded question token by question token (teacher forcing, kvd_eval's protocol); with w > 1 the
integration re-runs the last w - 1 question positions at every step with the keys retrieved since, so later
answers see corrected K/V. The graph index is the interesting case: with the exact scan kvd already equals
full attention on the tasks the model solves (BENCHMARKS.md), leaving nothing to correct. Prints a table last;
writes JSON to $OUT (if set) or bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT / "client", ROOT / "integrations" / "transformers", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from bench.accuracy import tasks  # noqa: E402
from bench.accuracy.kvd_eval import full_predictions, kvd_predictions  # noqa: E402
from bench.accuracy.model_def import MODEL_DIR, load_model  # noqa: E402
from bench.common import markdown_table  # noqa: E402
from bench.daemon import Daemon  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--tasks", default="mqar,passkey")
    p.add_argument("--lengths", default="4096,8192")
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--kind", default="graph")
    p.add_argument("--index-params", default="", help="k=v,... for the sessions' index")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--windows", default="1,2,4", help="retro windows w (1 = no correction)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = load_model(Path(args.model), device, torch.float32)
    params = dict(item.split("=", 1) for item in args.index_params.split(",") if item) or None
    windows = [int(w) for w in args.windows.split(",") if w]
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "cpu_count": os.cpu_count()}
    out = Path(args.out or os.path.join(os.environ.get("OUT") or ROOT / "bench" / "results", "retro_accuracy.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with Daemon() as daemon:
        from kvd_client import KvdClient

        client = KvdClient(daemon.target)
        for length in [int(n) for n in args.lengths.split(",") if n]:
            for task in [t for t in args.tasks.split(",") if t]:
                batch = tasks.make_batch(task, args.items, length, tasks.eval_generator(task, length, args.seed))
                batch = batch.to(device)
                full = full_predictions(model, batch)
                full_ok = tasks.answers_correct(full.pred, batch)
                mask = batch.answer_mask
                for w in windows:
                    t0 = time.perf_counter()
                    got, waited = kvd_predictions(model, client, batch, kind=args.kind, sink=args.sink,
                                                  window=args.window, top_ks=[args.top_k], index_params=params,
                                                  label=f"{length} {task} w={w}", retro_window=w)
                    res = got[args.top_k]
                    ok = tasks.answers_correct(res.pred, batch)
                    row = {"length": length, "task": task, "kind": args.kind, "top_k": args.top_k,
                           "retro_window": w, "accuracy": round(ok.float().mean().item(), 4),
                           "full_accuracy": round(full_ok.float().mean().item(), 4), "answers": ok.numel(),
                           "logp_err": round((res.logp - full.logp).abs()[mask].mean().item(), 4),
                           "retrieved": round(res.retrieved, 5), "index_share": round(res.index_share, 3),
                           "index_wait_s": waited, "seconds": round(time.perf_counter() - t0, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    out.write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))
        client.close()
    print(f"\nwrote {out}\n")
    print(markdown_table(rows, [("length", "length"), ("task", "task"), ("retro_window", "w"),
                                ("accuracy", "kvd accuracy"), ("full_accuracy", "full attention"),
                                ("logp_err", "|dlogp| vs full"), ("retrieved", "retrieved"),
                                ("index_share", "served by index")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
