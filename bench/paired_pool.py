"""RetroAttention's paired extra per token pooled over several `retro_bench.py --interleave` runs: every run's
per-step differences (retro - base, same token, adjacent in time) together, their median over the base's median,
with a bootstrap 95% interval. One run on the shared GPU host moves by a few points; pooling the pairs of several
runs (each a same-run comparison) narrows that without comparing steps of different runs.

    python3 -m bench.paired_pool --group before=bench/results/a_1.json,bench/results/a_2.json \
        --group after=bench/results/b_1.json,bench/results/b_2.json --out bench/results/pooled.json

Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

from bench.common import markdown_table


def paired_steps(path: str, variant: str) -> tuple[list[float], list[float]]:
    """(base step ms, variant step ms) of one interleaved run, step by step."""
    with open(path) as f:
        rows = {row["variant"]: row for row in json.load(f)["rows"]}
    base, other = rows["base"]["step_ms"], rows[variant]["step_ms"]
    if len(base) != len(other):
        raise ValueError(f"{path}: {len(base)} base steps against {len(other)} for {variant}")
    return base, other


def pooled_overhead(base: list[float], other: list[float], draws: int = 2000, seed: int = 0
                    ) -> tuple[float, float, float]:
    """100 x median(other - base) / median(base), and the 2.5% and 97.5% points of its bootstrap over the pairs."""
    diffs = [b - a for a, b in zip(base, other, strict=True)]

    def estimate(picked: list[int]) -> float:
        return 100 * statistics.median(diffs[i] for i in picked) / statistics.median(base[i] for i in picked)

    rng = random.Random(seed)
    boots = sorted(estimate([rng.randrange(len(diffs)) for _ in diffs]) for _ in range(draws))
    return estimate(list(range(len(diffs)))), boots[int(0.025 * draws)], boots[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", required=True, help="NAME=run.json,run.json,...")
    parser.add_argument("--variant", default="retro w=2")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for group in args.group:
        name, _, paths = group.partition("=")
        base: list[float] = []
        other: list[float] = []
        runs = []
        for path in paths.split(","):
            b, o = paired_steps(path, args.variant)
            runs.append(round(pooled_overhead(b, o, draws=1)[0], 2))
            base += b
            other += o
        est, low, high = pooled_overhead(base, other)
        rows.append({"group": name, "runs": len(runs), "pairs": len(base), "per_run_pct": runs,
                     "pooled_pct": round(est, 2), "ci95_low": round(low, 2), "ci95_high": round(high, 2)})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"variant": args.variant, "groups": args.group, "rows": rows}, f, indent=1)
    print(markdown_table(rows, [("group", "group"), ("runs", "runs"), ("pairs", "pairs"),
                                ("per_run_pct", "per run %"), ("pooled_pct", "pooled paired %"),
                                ("ci95_low", "95% low"), ("ci95_high", "95% high")]))


if __name__ == "__main__":
    main()
