"""Accuracy of the trained model (bench/accuracy/model/) with full attention vs kvd through the real daemon.

    python bench/accuracy/evaluate.py                    # GPU: the full grid, starts its own daemon
    python bench/accuracy/evaluate.py --cpu-smoke        # small contexts on the CPU (checks the script)
    python bench/accuracy/evaluate.py --plot-only bench/results/accuracy_h100.json   # redraw the heatmap

For every context length (the training length up to 8x it) and task (mqar, passkey, twohop): full attention's
answers, then kvd's: the window-only control (no retrieval: does the task need it?), each index kind and top-k
at the main sink/window, and other sink/window sizes (flat, main k). Every question token is a kvd decode step
(kvd_eval.py); `retrieved` is the share of the offloaded keys that kvd returned per step (top-k / offloaded,
mean over steps, layers and items); |dlogp| the mean gap of the answers' log-probabilities to full attention's.
    python bench/accuracy/evaluate.py --merge a.json,b.json --out c.json   # combine runs (e.g. two device calls)
Then a needle-in-a-haystack grid (passkey depth x length), full attention vs kvd at the main setting.
Prints a table last; writes JSON to $OUT (if set) or bench/results/, and the heatmap PNG next to it.
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

import transformers  # noqa: E402

from bench.accuracy import tasks  # noqa: E402
from bench.accuracy.kvd_eval import WINDOW_ONLY, Predictions, full_predictions, kvd_predictions  # noqa: E402
from bench.accuracy.model_def import MODEL_DIR, load_model  # noqa: E402
from bench.accuracy.plot import heatmaps  # noqa: E402
from bench.accuracy.report import goal_lines, summarize, table  # noqa: E402

SUCCESS = 0.95  # full attention "succeeds" at a length when its accuracy is at least this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--lengths", default=None, help="comma-separated context lengths (default: 1,2,4,8 x training)")
    p.add_argument("--items", type=int, default=32, help="items per task and length")
    p.add_argument("--index-items", type=int, default=0, help="items per task and length for the kinds other "
                                                               "than flat (their first ones; 0 = --items)")
    p.add_argument("--tasks", default=",".join(tasks.TASKS))
    p.add_argument("--kinds", default="flat,hnsw,graph,wave", help="index kinds ('' = full attention only)")
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--top-k", type=int, default=32, help="the main setting's k")
    p.add_argument("--sweep-k", default="8,32,128", help="k values run for every kind (same sessions)")
    p.add_argument("--sweep-windows", default="4:32,64:256", help="extra sink:window settings (flat, main k)")
    p.add_argument("--flush", type=int, default=16)
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the window-only control (no retrieval) at the main sink/window")
    p.add_argument("--index-params", default="", help="e.g. 'graph:ef=256;hnsw:ef=128'; a kind named 'graph@x' in "
                                                      "--kinds runs graph with the params of 'graph@x:...'")
    p.add_argument("--index-timeout", type=float, default=600.0)
    p.add_argument("--hint-samples", type=int, default=None, help="prefill queries per layer sent to kvd as index "
                                                                   "hints (default: KVDConfig's, 256; 0 = none)")
    p.add_argument("--hints-first", action="store_true",
                   help="flush the prefill and its index hints to kvd before the first decode step (by default "
                        "they ride on that step's append and can reach the daemon after its first Retrieve, "
                        "which then builds the index without them: kvd_eval.kvd_predictions)")
    p.add_argument("--niah-depths", default="0,0.2,0.4,0.6,0.8,1")
    p.add_argument("--niah-lengths", default=None, help="default: --lengths")
    p.add_argument("--niah-items", type=int, default=8, help="items per depth and length")
    p.add_argument("--niah-kind", default="graph")
    p.add_argument("--rope-scaling", default="none", choices=["none", "linear", "dynamic", "yarn"],
                   help="RoPE scaling for lengths above the training length (factor = length / training length)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default=None, help="an existing daemon; default: start one")
    p.add_argument("--memory-budget", default=None)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/accuracy.json or bench/results/)")
    p.add_argument("--tag", default="", help="suffix of the default output names")
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--plot-only", default=None, help="redraw the heatmap of an existing results JSON")
    p.add_argument("--merge", default=None, help="comma-separated result JSONs to combine into --out (rows of "
                                                 "--tasks only)")
    p.add_argument("--time-budget", type=float, default=0, help="seconds for the kvd groups (0 = no limit)")
    return p.parse_args(argv)


def ints(text: str | None) -> list[int]:
    return [int(x) for x in (text or "").split(",") if x.strip()]


def parse_index_params(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, kvs = part.partition(":")
        out[kind] = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
    return out


class Models:
    """The model at each RoPE scaling factor (one load per factor)."""

    def __init__(self, args: argparse.Namespace, train_length: int, device: torch.device) -> None:
        self.args, self.train_length, self.device = args, train_length, device
        self.dtype = getattr(torch, args.dtype)
        self._loaded: dict[float, Any] = {}

    def factor(self, length: int) -> float:
        if self.args.rope_scaling == "none" or length <= self.train_length:
            return 1.0
        return length / self.train_length

    def __call__(self, length: int) -> Any:
        f = self.factor(length)
        if f not in self._loaded:
            scaling = None
            if f != 1.0:
                scaling = {"rope_type": self.args.rope_scaling, "factor": f}
                if self.args.rope_scaling in ("dynamic", "yarn"):
                    scaling["original_max_position_embeddings"] = self.train_length
            self._loaded[f] = load_model(self.args.model, self.device, self.dtype, scaling)
        return self._loaded[f]


def score(pred: torch.Tensor, batch: tasks.Batch) -> torch.Tensor:
    """bool [B, answers]"""
    return tasks.answers_correct(pred.to(batch.tokens.device), batch).cpu()


def kvd_rows(args: argparse.Namespace, model: Any, client: Any, batch: tasks.Batch, full_ok: torch.Tensor,
             full: Predictions, length: int, groups: list[tuple[str, int, int, list[int]]],
             index_params: dict[str, dict[str, str]], counter: list[int], budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for kind, sink, window, ks in groups:
        counter[0] += 1
        if budget.over():
            print(f"[{counter[0]}/{counter[1]}] skipped (time budget)", file=sys.stderr, flush=True)
            continue
        t0 = time.perf_counter()
        label = f"[{counter[0]}/{counter[1]}] {length} {batch.task} {kind} sink {sink} window {window}"
        outcomes, waited = kvd_predictions(model, client, batch, kind=kind.split("@")[0], sink=sink, window=window,
                                           top_ks=ks,
                                           flush=args.flush, index_params=index_params.get(kind),
                                           index_timeout=args.index_timeout, label=label,
                                           hint_samples=args.hint_samples, hints_first=args.hints_first)
        for k, res in outcomes.items():
            ok = score(res.pred, batch)
            same = (res.pred.cpu() == full.pred.cpu()) | ~batch.answer_mask.cpu()
            mask = batch.answer_mask.cpu()
            logp_err = (res.logp.cpu() - full.logp.cpu()).abs()[mask].mean().item()
            agree = tasks.answers_correct(torch.where(same, batch.tokens.cpu(), -1), batch.to("cpu"))
            rows.append({"length": length, "task": batch.task, "mode": "kvd", "kind": kind, "sink": sink,
                         "window": window, "top_k": 0 if kind == WINDOW_ONLY else k, "correct": int(ok.sum()),
                         "answers": ok.numel(), "logp_err": round(logp_err, 4),
                         "accuracy": round(ok.float().mean().item(), 4),
                         "full_accuracy": round(full_ok.float().mean().item(), 4), "full_correct": int(full_ok.sum()),
                         "agreement": round(agree.float().mean().item(), 4), "retrieved": round(res.retrieved, 5),
                         "offloaded": round(res.offloaded, 1), "index_share": round(res.index_share, 3),
                         "index_wait_s": waited, "decode_s": round(res.decode_s, 2)})
        print(f"{label}: " + ", ".join(f"k={r['top_k']} acc {r['accuracy']:.3f} (full {r['full_accuracy']:.3f}) "
                                       f"retrieved {100 * r['retrieved']:.2f}% index {r['index_share']:.2f}"
                                       for r in rows[-len(outcomes):])
              + f" [{time.perf_counter() - t0:.0f}s, index wait {waited}s]", file=sys.stderr, flush=True)
    return rows


def niah(args: argparse.Namespace, models: Models, client: Any, index_params: dict[str, dict[str, str]],
         lengths: list[int], depths: list[float], budget: Budget) -> dict[str, Any]:
    """Passkey at fixed depths: grids [depth][length] of full attention's and kvd's accuracy."""
    grid_full: list[list[float | None]] = [[None] * len(lengths) for _ in depths]
    grid_kvd: list[list[float | None]] = [[None] * len(lengths) for _ in depths]
    cells = []
    for j, length in enumerate(lengths):
        model = models(length)
        parts = [tasks.make_batch("passkey", args.niah_items, length,
                                  tasks.eval_generator("passkey", length, args.seed, salt=1 + i), depth=d)
                 for i, d in enumerate(depths)]
        batch = concat(parts).to(models.device)
        full_ok = score(full_predictions(model, batch).pred, batch)
        kvd_ok = None
        meta: dict[str, Any] = {}
        if client is not None and not budget.over():
            t0 = time.perf_counter()
            outcomes, waited = kvd_predictions(model, client, batch, kind=args.niah_kind.split("@")[0], sink=args.sink,
                                               window=args.window, top_ks=[args.top_k], flush=args.flush,
                                               index_params=index_params.get(args.niah_kind),
                                               index_timeout=args.index_timeout, label=f"niah {length}",
                                               hint_samples=args.hint_samples, hints_first=args.hints_first)
            res = outcomes[args.top_k]
            kvd_ok = score(res.pred, batch)
            meta = {"retrieved": round(res.retrieved, 5), "index_share": round(res.index_share, 3),
                    "index_wait_s": waited}
            print(f"niah {length}: full {full_ok.float().mean():.3f} kvd {kvd_ok.float().mean():.3f} "
                  f"[{time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)
        for i, d in enumerate(depths):
            sl = slice(i * args.niah_items, (i + 1) * args.niah_items)
            grid_full[i][j] = round(full_ok[sl].float().mean().item(), 4)
            if kvd_ok is not None:
                grid_kvd[i][j] = round(kvd_ok[sl].float().mean().item(), 4)
            cells.append({"length": length, "depth": d, "full": grid_full[i][j], "kvd": grid_kvd[i][j], **meta})
    setting = f"kvd {args.niah_kind} k={args.top_k} sink {args.sink} window {args.window}"
    return {"depths": depths, "lengths": lengths, "items_per_cell": args.niah_items, "full": grid_full,
            "kvd": {setting: grid_kvd} if client is not None else {}, "cells": {setting: cells}}


class Budget:
    """Wall-clock budget of the kvd groups: once spent, the remaining ones are skipped (and listed)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0, self.skipped = seconds, time.perf_counter(), 0

    def over(self) -> bool:
        if self.seconds > 0 and time.perf_counter() - self.t0 > self.seconds:
            self.skipped += 1
            return True
        return False


def subset(batch: tasks.Batch, n: int) -> tasks.Batch:
    return tasks.Batch(batch.task, batch.tokens[:n], batch.answer_mask[:n], batch.answer_id[:n], batch.prompt_len,
                       batch.num_answers)


def concat(parts: list[tasks.Batch]) -> tasks.Batch:
    first = parts[0]
    return tasks.Batch(first.task, torch.cat([p.tokens for p in parts]), torch.cat([p.answer_mask for p in parts]),
                       torch.cat([p.answer_id for p in parts]), first.prompt_len, first.num_answers)


def draw(result: dict[str, Any], png: str | Path) -> str:
    grid = result["niah"]
    panels = {"full attention": grid["full"]}
    panels.update({name: g for name, g in grid["kvd"].items() if any(v is not None for row in g for v in row)})
    return heatmaps(panels, grid["depths"], grid["lengths"], png, title="passkey needle: accuracy by depth x length")


def merge(paths: list[str]) -> dict[str, Any]:
    """Results of several runs (e.g. one per device call) as one: rows (full attention rows once), NIAH grids."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged: dict[str, Any] = {"env": runs[0]["env"], "args": [r["args"] for r in runs], "rows": [], "niah": None,
                              "merged_from": [str(p) for p in paths]}
    seen = set()
    for run in runs:
        for row in run["rows"]:
            key = json.dumps({k: row.get(k) for k in ("length", "task", "mode", "kind", "sink", "window", "top_k")})
            if key not in seen:
                seen.add(key)
                merged["rows"].append(row)
        grid = run.get("niah")
        if grid:
            if merged["niah"] is None:
                merged["niah"] = {**grid, "kvd": dict(grid["kvd"]), "cells": dict(grid["cells"])}
            else:
                merged["niah"]["kvd"].update(grid["kvd"])
                merged["niah"]["cells"].update(grid["cells"])
    return merged


def finish(result: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Summary, goal check, JSON, heatmap, and the table (printed last)."""
    result["summary"] = summarize(result["rows"])
    result["goal"] = goal_lines(result["summary"], args.top_k, args.sink, args.window, SUCCESS)
    out.write_text(json.dumps(result, indent=1))
    if result.get("niah"):
        png = out.with_suffix(".png")
        print(f"heatmap: {png} ({draw(result, png)})")
    print(f"\nwrote {out}\n")
    print(table(result["summary"]))
    print("\n".join(result["goal"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        result = json.loads(Path(args.plot_only).read_text())
        png = Path(args.plot_only).with_suffix(".png")
        print(f"wrote {png} ({draw(result, png)})")
        return 0
    if args.merge:
        if not args.out:
            raise SystemExit("--merge needs --out")
        result = merge(args.merge.split(","))
        keep = set(args.tasks.split(","))
        result["rows"] = [r for r in result["rows"] if r["task"] in keep]
        finish(result, Path(args.out), args)
        return 0
    model_dir = Path(args.model)
    log_path = model_dir / "training_log.json"
    train_length = json.loads(log_path.read_text())["recipe"]["length"] if log_path.exists() else 2048
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        defaults = parse_args([])
        args.lengths = args.lengths or "256,512"
        args.items = min(args.items, 4)
        for name, small in (("kinds", "flat,graph"), ("sweep_k", "8,32"), ("sweep_windows", "4:32"),
                            ("niah_depths", "0,0.5,1"), ("niah_items", 2), ("niah_kind", "flat")):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, small)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = ints(args.lengths) or [train_length * m for m in (1, 2, 4, 8)]
    niah_lengths = ints(args.niah_lengths) or lengths
    depths = [float(x) for x in args.niah_depths.split(",") if x.strip()]
    kinds = [k for k in args.kinds.split(",") if k]
    sweep_k = sorted(set(ints(args.sweep_k)) | {args.top_k})
    windows = [tuple(int(x) for x in sw.split(":")) for sw in args.sweep_windows.split(",") if sw]
    index_params = parse_index_params(args.index_params)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "cpu_count": os.cpu_count(), "train_length": train_length}
    print(json.dumps(env), flush=True)
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    suffix = ("_cpu_smoke" if args.cpu_smoke else "") + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out) if args.out else base / f"accuracy{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"env": env, "args": vars(args), "rows": [], "niah": None}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    models = Models(args, train_length, device)
    daemon = client = None
    if kinds:
        from kvd_client import KvdClient

        from bench.daemon import Daemon
        if not args.target:
            daemon = Daemon(args.memory_budget)
        client = KvdClient(args.target or daemon.target)  # type: ignore[union-attr]
    # priority order (a --time-budget skips the tail): every kind's main setting, the NIAH grid, then the
    # other sink/window sizes
    mains = [(WINDOW_ONLY, args.sink, args.window, [args.top_k])] if kinds and args.control else []
    mains += [(kind, args.sink, args.window, sweep_k) for kind in kinds]
    extras = [("flat", s, w, [args.top_k]) for s, w in windows] if kinds else []
    task_list = [t for t in args.tasks.split(",") if t]
    counter = [0, (len(mains) + len(extras)) * len(task_list) * len(lengths)]
    t_start = time.perf_counter()
    budget = Budget(args.time_budget)
    try:
        cases = []
        for length in lengths:
            for task in task_list:
                batch = tasks.make_batch(task, args.items, length,
                                         tasks.eval_generator(task, length, args.seed)).to(device)
                full = full_predictions(models(length), batch)
                full_ok = score(full.pred, batch)
                result["rows"].append({"length": length, "task": task, "mode": "full", "correct": int(full_ok.sum()),
                                       "answers": full_ok.numel(), "accuracy": round(full_ok.float().mean().item(), 4),
                                       "rope_factor": models.factor(length)})
                print(f"{length} {task} full attention: {full_ok.float().mean():.3f} "
                      f"[{time.perf_counter() - t_start:.0f}s]", file=sys.stderr, flush=True)
                cases.append((length, batch, full))
        save()
        for group_list in (mains, "niah", extras):
            if group_list == "niah":
                if depths and niah_lengths:
                    result["niah"] = niah(args, models, client, index_params, niah_lengths, depths, budget)
                    save()
                continue
            for group in group_list:
                for length, batch, full in cases:
                    if client is None:
                        continue
                    n = args.items if group[0] in ("flat", WINDOW_ONLY) else min(args.items,
                                                                                 args.index_items or args.items)
                    sub, sub_full = subset(batch, n), Predictions(full.pred[:n], full.logp[:n])
                    result["rows"] += kvd_rows(args, models(length), client, sub, score(sub_full.pred, sub), sub_full,
                                               length, [group], index_params, counter, budget)
                    save()
    finally:
        if client is not None:
            client.close()
        if daemon is not None:
            daemon.stop()
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    result["skipped_for_time"] = budget.skipped
    finish(result, out, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
