"""The client's torch ops per decode layer, base vs RetroAttention (w=2), on the CPU: every aten op the model's
forward dispatches, counted by the integration's call site (TorchDispatchMode), with launch-ahead decoding through
the CPU tests' host stand-in for the stream wait. On the GPU host each op costs the model's thread ~5-20 us (a
launch, or a view's bookkeeping), and that thread is on the decode's critical path; this counts them without one.

    python3 -m bench.client_ops --out bench/results/client_ops_2core.json

Prints a table last (the call sites whose counts differ) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections import Counter
from typing import Any

import kvd_transformers
import torch
from kvd_client import KvdClient
from kvd_transformers import KVDCache
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import markdown_table
from bench.daemon import Daemon
from tests.test_launch_ahead import HostWaiter
from tests.test_transformers_kvd import SMALL, sid, tiny_llama

_OURS = ("kvd_transformers", "transformers/models", "transformers/masking")


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops by (innermost integration or model frame, op)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        frames = [f for f in traceback.extract_stack(limit=14) if any(part in f.filename for part in _OURS)]
        site = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].name}" if frames else "other"
        self.sites[(site, str(func).removeprefix("aten."))] += 1
        return func(*args, **(kwargs or {}))


def count(model: Any, client: Any, retro: bool, ids: torch.Tensor, prompt: int, warm: int) -> tuple[Counter, int]:
    cache = KVDCache(client, session=sid("ops"), top_k=6, index="flat", retro=retro, retro_window=2,
                     launch_ahead=True, **SMALL)
    counter = OpCounter()
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache)
        for t in range(prompt, prompt + warm):
            model(ids[:, t:t + 1], past_key_values=cache)
        with counter:
            for t in range(prompt + warm, ids.shape[1]):
                model(ids[:, t:t + 1], past_key_values=cache)
    ahead = cache.stats.ahead_runs
    cache.close()
    return counter.sites, ahead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="decode forwards counted")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    model = tiny_llama(sharpen=3.0, seed=7)
    kvd_transformers.enable(model)
    layers = model.config.num_hidden_layers
    prompt, warm = 80, 40
    ids = torch.randint(1, 97, (1, prompt + warm + args.steps), generator=torch.Generator().manual_seed(7))
    waiter = HostWaiter()
    KVDCache._waiter = staticmethod(lambda device: waiter)  # the CPU tests' stand-in for the stream wait
    daemon = Daemon()
    client = KvdClient(daemon.target)
    try:
        counted = {retro: count(model, client, retro, ids, prompt, warm) for retro in (False, True)}
    finally:
        client.close()
        daemon.stop()
    per_layer = {retro: {site: n / (args.steps * layers) for site, n in sites.items()}
                 for retro, (sites, _) in counted.items()}
    totals = {retro: round(sum(sites.values()), 2) for retro, sites in per_layer.items()}
    rows = []
    for site in sorted(set(per_layer[False]) | set(per_layer[True]),
                       key=lambda s: per_layer[False].get(s, 0) - per_layer[True].get(s, 0)):
        base, retro = per_layer[False].get(site, 0.0), per_layer[True].get(site, 0.0)
        if base != retro:
            rows.append({"site": site[0], "op": site[1], "base": round(base, 2), "retro": round(retro, 2),
                         "extra": round(retro - base, 2)})
    result = {"layers": layers, "steps": args.steps,
              "ops_per_layer": {"base": totals[False], "retro w=2": totals[True]},
              "ahead_runs": {"base": counted[False][1], "retro w=2": counted[True][1]}, "sites": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown_table(rows, [("site", "call site"), ("op", "op"), ("base", "base / layer"),
                                ("retro", "retro / layer"), ("extra", "extra")]))
    print(f"\nops per decode layer (model included): base {totals[False]}, retro w=2 {totals[True]} "
          f"(+{totals[True] - totals[False]:.2f})")


if __name__ == "__main__":
    main()
