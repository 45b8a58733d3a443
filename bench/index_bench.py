"""Index benchmark (issue 4, item 4): every index kind and setting on realistic and real (MiniLM) Q/K.

For each data set and size: the first `--sink` keys and the last `--window` keys are the GPU's static part
(exact); the index is built over the middle keys (local ids 0..m-1) with hints from the GPU side (a sample of
prefill queries and their exact top-N middle keys, computed here to simulate the GPU and timed apart as
hint_s). Per decode query (one token, all query heads batched in one search call = one layer):

- recall@k: |ids & exact top-k of the middle| / k, averaged over tokens and query heads;
- touched: SearchResult.keys_touched / keys indexed (keys_touched is per query head, as kvd.index.flat
  and kvd.index.wave report it);
- rel_err: ||o - o_full|| / ||o_full|| per token and head, where o merges by log-sum-exp the exact static
  part, exact attention over the returned ids and the index's Estimate (if any), against full attention;
- latency: search + gather + partial attention + merge with the estimate (the CPU side of one layer), ms;
- build_s (hints given), bytes/key = index.nbytes() / (keys indexed * num_kv_heads).

A row `oracle` (exact top-k ids, no index) shows the error floor of top-k retrieval itself. Kinds come from
kvd.index.<kind> (skipped with a note when the module does not exist yet); `standin` is a brute-force index
defined here to check the harness (param frac: it scans a strided fraction of the keys; estimate=exact: it
also returns the exact attention of the keys it did not return, so rel_err must be ~0 at any recall).

Settings: a class attribute BENCH_SWEEP (list of {"label", "build", "search"}) on the index class wins over
DEFAULT_SWEEPS below; `--sweep KIND=JSON` wins over both.

    .venv/bin/python -m bench.index_bench --quick --kinds standin,flat,wave
    .venv/bin/python -m bench.index_bench --data realistic,minilm --sizes 32K,128K
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bench import qkdata
from kvd.index.base import BuildHints, Estimate, IndexShape, KeyIndex, SearchResult

KINDS = ("flat", "hnsw", "graph", "wave")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Setting:
    label: str
    build: dict[str, str] = field(default_factory=dict)
    search: dict[str, str] = field(default_factory=dict)


def _ef_sweep(name: str, values: Iterable[int]) -> list[Setting]:
    return [Setting(f"{name}={v}", {}, {name: str(v)}) for v in values]


DEFAULT_SWEEPS: dict[str, list[Setting]] = {
    "flat": [Setting("exact")],
    "hnsw": _ef_sweep("ef", (100, 200, 400, 800, 1600)),
    "graph": _ef_sweep("ef", (100, 200, 400, 800, 1600)),
    "wave": [Setting(f"r={r},e={e}", {}, {"retrieval_fraction": str(r), "estimation_fraction": str(e)})
             for r, e in ((0.01, 0.23), (0.018, 0.0), (0.018, 0.23), (0.03, 0.23), (0.05, 0.23))],
    "standin": [Setting(f"frac={f}", {}, {"frac": str(f)}) for f in (0.02, 0.1, 0.5, 1.0)]
    + [Setting("frac=0.1,est", {}, {"frac": "0.1", "estimate": "exact"})],
}


# ------------------------------------------------------------------------------------- stand-in index


class StandInIndex(KeyIndex):
    """Brute force over a strided fraction of the keys (the bench's self-check, not a real kind)."""

    kind = "standin"
    BENCH_SWEEP: ClassVar[list[Setting]] = DEFAULT_SWEEPS["standin"]

    def __init__(self, shape: IndexShape, params: dict[str, str] | None = None) -> None:
        super().__init__(shape, params)
        self._keys = torch.empty(shape.num_kv_heads, 0, shape.head_dim)
        self._values: torch.Tensor | None = None

    def build(self, keys: torch.Tensor, values: torch.Tensor | None, hints: BuildHints | None) -> None:
        self._keys = keys.float().contiguous()
        self._values = None if values is None else values.float().contiguous()

    def add(self, keys: torch.Tensor, values: torch.Tensor | None) -> None:
        self._keys = torch.cat([self._keys, keys.float()], dim=1)
        if self._values is not None and values is not None:
            self._values = torch.cat([self._values, values.float()], dim=1)

    def search(self, queries: torch.Tensor, k: int, scale: float, params: dict[str, str] | None = None
               ) -> SearchResult:
        p = {**self.params, **(params or {})}
        frac = float(p.get("frac", "1.0"))
        n = self.count
        step = max(1, round(1.0 / max(frac, 1e-9)))
        subset = torch.arange(0, n, step)
        g = self.shape.group_size
        keys = self._keys[:, subset]                                                  # [Hkv, s, d]
        scores = torch.einsum("hgd,hsd->hgs", queries.reshape(-1, g, queries.shape[-1]), keys)
        scores = scores.reshape(queries.shape[0], -1)
        top = torch.topk(scores, min(k, subset.numel()), dim=-1)
        ids = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
        ids[:, : top.indices.shape[1]] = subset[top.indices]
        estimate = None
        if p.get("estimate") == "exact" and self._values is not None:
            estimate = self._exact_rest(queries, ids, scale)
        return SearchResult(ids=ids, estimate=estimate, keys_touched=int(subset.numel()))

    def _exact_rest(self, queries: torch.Tensor, ids: torch.Tensor, scale: float) -> Estimate:
        """Exact partial attention over every key not in ids (a perfect estimation zone)."""
        assert self._values is not None
        hkv, g = self.shape.num_kv_heads, self.shape.group_size
        q = queries.reshape(hkv, g, -1)
        sc = torch.bmm(q, self._keys.transpose(1, 2)).reshape(queries.shape[0], -1) * scale
        sc.scatter_(1, ids.clamp_min(0), float("-inf"))
        lse = torch.logsumexp(sc, dim=-1)
        p = torch.exp(sc - lse[:, None]).reshape(hkv, g, -1)
        out = torch.bmm(p, self._values).reshape(queries.shape[0], -1)
        return Estimate(out, lse)

    @property
    def count(self) -> int:
        return self._keys.shape[1]

    def nbytes(self) -> int:
        return 0

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"keys": self._keys, "values": self._values}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, shape: IndexShape, params: dict[str, str], data: bytes) -> StandInIndex:
        state = torch.load(io.BytesIO(data))
        idx = cls(shape, params)
        idx._keys, idx._values = state["keys"], state["values"]
        return idx


# ------------------------------------------------------------------------------------------ helpers


def progress(it: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """tqdm when installed (to stderr), else a small in-place counter."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr, mininterval=0.5)
        return
    t0 = time.perf_counter()
    for i, x in enumerate(it):
        if i % max(1, total // 20) == 0:
            print(f"\r  {desc}: {i}/{total} ({time.perf_counter() - t0:.0f}s)", end="", file=sys.stderr,
                  flush=True)
        yield x
    print(f"\r  {desc}: {total}/{total} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)


def load_index_class(kind: str) -> type[KeyIndex] | None:
    """The KeyIndex subclass of kvd.index.<kind> (None, with a note, when the module does not exist)."""
    if kind == "standin":
        return StandInIndex
    name = f"kvd.index.{kind}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            print(f"note: {name} does not exist yet: kind '{kind}' skipped")
            return None
        raise
    found = [c for _, c in inspect.getmembers(module, inspect.isclass)
             if issubclass(c, KeyIndex) and c.__module__ == name and not inspect.isabstract(c)]
    exact = [c for c in found if getattr(c, "kind", None) == kind]
    chosen = exact or found
    if not chosen:
        print(f"note: {name} defines no KeyIndex subclass: kind '{kind}' skipped")
        return None
    return chosen[0]


def sweep_for(kind: str, cls: type[KeyIndex], overrides: dict[str, list[Setting]]) -> list[Setting]:
    if kind in overrides:
        return overrides[kind]
    own = getattr(cls, "BENCH_SWEEP", None)
    if own:
        return [s if isinstance(s, Setting) else Setting(**s) for s in own]
    return DEFAULT_SWEEPS.get(kind, [Setting("default")])


def parse_sweep(text: str) -> tuple[str, list[Setting]]:
    """KIND=JSON, JSON a list of {"label", "build", "search"} or of plain search-param dicts."""
    kind, _, body = text.partition("=")
    items = json.loads(body)
    out = []
    for item in items:
        if "search" in item or "build" in item:
            out.append(Setting(item.get("label") or json.dumps(item), item.get("build", {}),
                               {k: str(v) for k, v in item.get("search", {}).items()}))
        else:
            out.append(Setting(",".join(f"{k}={v}" for k, v in item.items()), {},
                               {k: str(v) for k, v in item.items()}))
    return kind, out


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = 1024 if t.endswith("K") else 1024 * 1024 if t.endswith("M") else 1
    return int(float(t.rstrip("KM")) * mult)


# ---------------------------------------------------------------------------------- attention math


def partial_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ids: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of queries [Hq, d] over keys[h // g, ids[h]] (-1 = none): (out [Hq, d], lse [Hq])."""
    hq = queries.shape[0]
    heads = (torch.arange(hq) // (hq // keys.shape[0]))[:, None]
    valid = ids >= 0
    safe = ids.clamp_min(0)
    k_sel = keys[heads, safe]                                                         # [Hq, k, d]
    v_sel = values[heads, safe]
    sc = torch.einsum("hd,hkd->hk", queries, k_sel) * scale
    sc = sc.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)
    p = torch.exp(sc - lse[:, None]).nan_to_num(0.0)
    return torch.einsum("hk,hkd->hd", p, v_sel), lse


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial attentions over disjoint key sets (lse = -inf: empty part)."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    total = w1 + w2
    out = (w1[..., None] * o1 + w2[..., None] * o2) / total.clamp_min(1e-30)[..., None]
    return out, m + torch.log(total)


def recall_at_k(ids: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per row |ids & exact| / k; ids [R, k] (-1 padded), exact [R, k]."""
    rows, k = exact.shape
    big = int(max(ids.max().item(), exact.max().item())) + 2
    offs = torch.arange(rows)[:, None] * big
    got = torch.where(ids >= 0, ids + offs, torch.full_like(ids, -1))
    hit = torch.isin(got, exact + offs)
    return hit.sum(-1).float() / k


def dup_fraction(ids: torch.Tensor) -> float:
    s = ids.sort(dim=-1).values
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    return float(dup.float().mean())


# ------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One data set at one size, split and with its references."""

    data: qkdata.QKData
    mid_keys: torch.Tensor         # [Hkv, m, d]
    mid_values: torch.Tensor
    queries: torch.Tensor          # [T, Hq, d] decode queries
    exact_ids: torch.Tensor        # [T, Hq, k] exact top-k local ids in the middle
    full_out: torch.Tensor         # [T, Hq, d]
    static_out: torch.Tensor       # [T, Hq, d] attention over sink + window
    static_lse: torch.Tensor       # [T, Hq]
    hints: BuildHints | None       # None with --prefill-sample 0
    hint_s: float
    stats: dict[str, Any]


def make_case(data: qkdata.QKData, k: int, sink: int, window: int, hint_topn: int) -> Case:
    n = data.n_keys
    if n <= sink + window + k:
        raise ValueError(f"{n} keys leave no middle beyond sink {sink} + window {window} + k {k}")
    g = data.group_size
    q = data.decode_queries.transpose(0, 1).contiguous()                             # [Hq, T, d]
    mid_k = data.keys[:, sink:n - window].contiguous()
    mid_v = data.values[:, sink:n - window].contiguous()
    _, exact = qkdata.exact_topk(q, mid_k, k, g, chunk=256)
    full_out, _ = qkdata.full_attention(q, data.keys, data.values, data.scale)
    static = torch.cat([torch.arange(sink), torch.arange(n - window, n)])
    st_out, st_lse = qkdata.full_attention(q, data.keys[:, static], data.values[:, static], data.scale)
    hints, hint_s = None, 0.0
    if data.prefill_queries.shape[1] > 0:
        t0 = time.perf_counter()
        _, topn = qkdata.exact_topk(data.prefill_queries, mid_k, hint_topn, g, chunk=256)
        hint_s = time.perf_counter() - t0
        hints = BuildHints(queries=data.prefill_queries, topn_ids=topn)
    stats = {"attention": qkdata.attention_stats(data, sink, window, (k, 10 * k)),
             "ood_kv_head0": qkdata.ood_stats(data.keys[0], q[:g].reshape(-1, data.head_dim))}
    return Case(data, mid_k, mid_v, data.decode_queries, exact.transpose(0, 1).contiguous(),
                full_out.transpose(0, 1).contiguous(), st_out.transpose(0, 1).contiguous(),
                st_lse.transpose(0, 1).contiguous(), hints, hint_s, stats)


def shape_of(data: qkdata.QKData) -> IndexShape:
    return IndexShape(data.num_kv_heads, data.num_query_heads, data.head_dim)


def build_index(cls: type[KeyIndex], case: Case, setting: Setting, add_frac: float
                ) -> tuple[KeyIndex, float, float]:
    """Build (and with add_frac, build on a prefix then add() the rest). Returns (index, build_s, add_s)."""
    idx = cls(shape_of(case.data), setting.build)
    m = case.mid_keys.shape[1]
    cut = m - int(m * add_frac)
    hints = case.hints
    if cut < m and hints is not None and hints.topn_ids is not None and hints.queries is not None:
        q = hints.queries
        _, topn = qkdata.exact_topk(q, case.mid_keys[:, :cut], hints.topn_ids.shape[-1],
                                    case.data.group_size, chunk=256)
        hints = BuildHints(queries=q, topn_ids=topn)
    t0 = time.perf_counter()
    idx.build(case.mid_keys[:, :cut], case.mid_values[:, :cut], hints)
    build_s = time.perf_counter() - t0
    add_s = 0.0
    if cut < m:
        t0 = time.perf_counter()
        idx.add(case.mid_keys[:, cut:], case.mid_values[:, cut:])
        add_s = time.perf_counter() - t0
    return idx, build_s, add_s


def search_attend(idx: KeyIndex, case: Case, q: torch.Tensor, k: int, params: dict[str, str]
                  ) -> tuple[SearchResult, torch.Tensor, torch.Tensor]:
    """The timed CPU side of one layer: search, gather, partial attention, merge the estimate."""
    res = idx.search(q, k, case.data.scale, params)
    out, lse = partial_attention(q, case.mid_keys, case.mid_values, res.ids, case.data.scale)
    if res.estimate is not None:
        out, lse = merge(out, lse, res.estimate.output.float(), res.estimate.lse.float())
    return res, out, lse


def evaluate(case: Case, label: str, run_one: Any) -> dict[str, Any]:
    """Run run_one(t) -> (ids [Hq, k], out, lse, touched, seconds) for every decode token; metrics."""
    recalls, errs, touched, lat, dups = [], [], [], [], []
    t_count = case.queries.shape[0]
    for t in progress(range(t_count), t_count, label):
        ids, out, lse, n_touched, secs = run_one(t)
        o, _ = merge(case.static_out[t], case.static_lse[t], out, lse)
        ref = case.full_out[t]
        errs.append((o - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30))
        recalls.append(recall_at_k(ids, case.exact_ids[t]))
        touched.append(n_touched / case.mid_keys.shape[1])
        lat.append(secs * 1e3)
        dups.append(dup_fraction(ids))
    err = torch.cat(errs).numpy()
    rec = torch.cat(recalls).numpy()
    return {"recall": float(rec.mean()), "recall_p10": float(np.percentile(rec, 10)),
            "touched": float(np.mean(touched)), "rel_err": float(err.mean()),
            "rel_err_p95": float(np.percentile(err, 95)), "rel_err_max": float(err.max()),
            "lat_ms_p50": float(np.median(lat)), "lat_ms_p90": float(np.percentile(lat, 90)),
            "dup_frac": float(np.mean(dups))}


def oracle_row(case: Case, k: int) -> dict[str, Any]:
    def run_one(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
        ids = case.exact_ids[t]
        out, lse = partial_attention(case.queries[t], case.mid_keys, case.mid_values, ids, case.data.scale)
        return ids, out, lse, case.mid_keys.shape[1], 0.0
    return {"kind": "oracle", "setting": f"exact top-{k}", **evaluate(case, "oracle", run_one)}


def kind_rows(kind: str, cls: type[KeyIndex], case: Case, settings: list[Setting], k: int, add_frac: float
              ) -> list[dict[str, Any]]:
    """Build once per distinct build setting, then every search setting on it."""
    rows: list[dict[str, Any]] = []
    by_build: dict[str, list[Setting]] = {}
    for s in settings:
        by_build.setdefault(json.dumps(s.build, sort_keys=True), []).append(s)
    for group in by_build.values():
        try:
            idx, build_s, add_s = build_index(cls, case, group[0], add_frac)
        except Exception as e:  # a failing kind must not end the benchmark of the others
            print(f"error: {kind} build {group[0].build}: {type(e).__name__}: {e}")
            rows.append({"kind": kind, "setting": group[0].label, "build_params": group[0].build,
                         "error": f"build: {type(e).__name__}: {e}"})
            continue
        bytes_per_key = idx.nbytes() / max(1, idx.count * case.data.num_kv_heads)
        for s in group:
            rows.append(_search_row(kind, idx, case, s, k, build_s, add_s, bytes_per_key))
        del idx
    return rows


def _search_row(kind: str, idx: KeyIndex, case: Case, s: Setting, k: int, build_s: float, add_s: float,
                bytes_per_key: float) -> dict[str, Any]:
    base = {"kind": kind, "setting": s.label, "build_params": s.build, "search_params": s.search,
            "build_s": build_s, "add_s": add_s, "hint_s": case.hint_s, "bytes_per_key": bytes_per_key}

    def run_one(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
        q = case.queries[t]
        t0 = time.perf_counter()
        res, out, lse = search_attend(idx, case, q, k, s.search)
        secs = time.perf_counter() - t0
        return res.ids, out, lse, res.keys_touched, secs

    try:
        search_attend(idx, case, case.queries[0], k, s.search)       # warm-up (first-call allocations)
        return {**base, **evaluate(case, f"{kind} {s.label}", run_one)}
    except Exception as e:
        print(f"error: {kind} {s.label}: {type(e).__name__}: {e}")
        return {**base, "error": f"search: {type(e).__name__}: {e}"}


# ------------------------------------------------------------------------------------------ output


COLUMNS = (("data", "{}"), ("n", "{}"), ("kind", "{}"), ("setting", "{}"), ("recall", "{:.3f}"),
           ("touched", "{:.2%}"), ("rel_err", "{:.2%}"), ("rel_err_p95", "{:.2%}"), ("build_s", "{:.2f}"),
           ("hint_s", "{:.2f}"), ("lat_ms_p50", "{:.2f}"), ("lat_ms_p90", "{:.2f}"), ("bytes_per_key", "{:.1f}"))


def format_table(rows: list[dict[str, Any]]) -> str:
    head = [c for c, _ in COLUMNS]
    body = []
    for r in rows:
        if "error" in r:
            body.append([str(r.get(c, "")) for c in head[:4]] + [f"ERROR {r['error']}"[:80]])
            continue
        body.append([fmt.format(r[c]) if c in r else "-" for c, fmt in COLUMNS])
    widths = [max(len(head[i]), *(len(b[i]) for b in body if i < len(b))) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=False)) for b in body]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["data"], r["n"]) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4.5), squeeze=False)
    for ax, (data, n) in zip(axes[0], cases, strict=True):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if (r["data"], r["n"]) == (data, n) and "error" not in r and r["kind"] != "oracle":
                name = r["kind"] + (f" {r['build_params']}" if r.get("build_params") else "")
                series.setdefault(name, []).append((r["touched"], r["recall"]))
        for i, (name, pts) in enumerate(sorted(series.items())):
            pts.sort()
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="os^Dv*P"[i % 7],
                    ms=9 - i % 3 * 2, alpha=0.85, label=name)
        ax.axhline(0.95, color="grey", ls=":", lw=1)
        ax.axvline(2.0, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("keys touched (% of indexed)")
        ax.set_ylabel("recall@100")
        ax.set_title(f"{data}, {n // 1024}K keys")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main


def load_data(name: str, n: int, args: argparse.Namespace) -> qkdata.QKData:
    if name == "realistic":
        return qkdata.realistic(n, n_queries=args.queries, n_prefill=args.prefill_sample, seed=args.seed)
    if name == "minilm":
        return qkdata.minilm(n, n_queries=args.queries, n_prefill=args.prefill_sample, seed=args.seed,
                             layer=args.minilm_layer)
    raise ValueError(f"unknown data set {name!r} (realistic, minilm)")


def run_case(name: str, n: int, kinds: dict[str, type[KeyIndex]], overrides: dict[str, list[Setting]],
             args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    t0 = time.perf_counter()
    data = load_data(name, n, args)
    gen_s = time.perf_counter() - t0
    case = make_case(data, args.k, args.sink, args.window, args.hint_topn)
    print(f"== {data.name} n={n}: Hkv={data.num_kv_heads} Hq={data.num_query_heads} d={data.head_dim} "
          f"middle={case.mid_keys.shape[1]} decode={case.queries.shape[0]} "
          f"prefill sample={data.prefill_queries.shape[1]}; data {gen_s:.1f}s, hints {case.hint_s:.1f}s")
    rows = [oracle_row(case, args.k)]
    for kind, cls in kinds.items():
        settings = sweep_for(kind, cls, overrides)
        if args.quick and len(settings) > 3:
            settings = [settings[0], settings[len(settings) // 2], settings[-1]]
        rows += kind_rows(kind, cls, case, settings, args.k, args.add_frac)
    for r in rows:
        r.update(data=data.name, n=n, n_indexed=int(case.mid_keys.shape[1]))
    info = {"data_seconds": gen_s, "hint_seconds": case.hint_s, **case.stats,
            "meta": {k: v for k, v in data.meta.items() if k != "config"}}
    return rows, info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="realistic,minilm", help="comma list: realistic, minilm")
    ap.add_argument("--sizes", default="32K,128K", help="comma list of key counts (32K, 131072, ...)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {KINDS} and/or standin")
    ap.add_argument("--quick", action="store_true", help="8K keys, 16 queries, 1024 prefill, fewer settings")
    ap.add_argument("--queries", type=int, default=64, help="decode queries (tokens) per case")
    ap.add_argument("--prefill-sample", type=int, default=4096,
                    help="prefill queries given as hints (0: build without hints)")
    ap.add_argument("--hint-topn", type=int, default=100, help="exact top-N per hint query")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--add-frac", type=float, default=0.0,
                    help="build on the first (1-f) of the middle, then add() the rest (decode-time keys)")
    ap.add_argument("--sweep", action="append", default=[], metavar="KIND=JSON",
                    help='e.g. graph=\'[{"ef": 64}, {"ef": 128}]\'')
    ap.add_argument("--minilm-layer", type=int, default=1, help="MiniLM layer (1: its sparsest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tag", default="", help="results file suffix (default: quick or full)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = "8K" if args.sizes == "32K,128K" else args.sizes
        args.queries = min(args.queries, 16)
        args.prefill_sample = min(args.prefill_sample, 1024)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(parse_sweep(s) for s in args.sweep)
    kinds = {k: c for k in args.kinds.split(",") if k and (c := load_index_class(k)) is not None}
    rows: list[dict[str, Any]] = []
    cases: dict[str, Any] = {}
    for name in args.data.split(","):
        for n in (parse_size(s) for s in args.sizes.split(",")):
            try:
                case_rows, info = run_case(name, n, kinds, overrides, args)
            except RuntimeError as e:
                print(f"note: data set {name} skipped: {e}")
                continue
            rows += case_rows
            cases[f"{case_rows[0]['data']}/{n}"] = info
            print(format_table(case_rows))
    tag = args.tag or ("quick" if args.quick else "full")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"argv": sys.argv[1:] if argv is None else argv, "args": vars(args),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version(),
            "default_sweeps": {k: [asdict(s) for s in v] for k, v in DEFAULT_SWEEPS.items()}}
    json_path = out_dir / f"index_bench_{tag}.json"
    json_path.write_text(json.dumps({"meta": meta, "cases": cases, "rows": rows}, indent=1, default=str))
    if rows and not args.no_plot:
        plot(rows, out_dir / f"index_bench_{tag}.png")
    print("\n" + format_table(rows))
    print(f"\nwrote {json_path}" + ("" if args.no_plot or not rows else f" and {json_path.with_suffix('.png')}"))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
