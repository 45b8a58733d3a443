"""bench.paired_pool: the pooled paired overhead of interleaved retro_bench runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.paired_pool import paired_steps, pooled_overhead


def run_file(path: Path, base: list[float], retro: list[float]) -> str:
    path.write_text(json.dumps({"rows": [{"variant": "base", "step_ms": base},
                                         {"variant": "retro w=2", "step_ms": retro}]}))
    return str(path)


def test_pooled_overhead_is_the_median_step_difference_over_the_median_base() -> None:
    base, retro = [100.0, 110.0, 90.0, 300.0], [105.0, 112.0, 99.0, 301.0]  # differences 5, 2, 9, 1
    estimate, low, high = pooled_overhead(base, retro)
    assert estimate == pytest.approx(100 * 3.5 / 105.0)
    assert low <= estimate <= high
    assert pooled_overhead(base, base)[0] == 0.0


def test_runs_pool_their_pairs_and_uneven_runs_are_refused(tmp_path: Path) -> None:
    first = run_file(tmp_path / "a.json", [100.0, 100.0], [104.0, 106.0])
    second = run_file(tmp_path / "b.json", [50.0], [52.0])
    pairs = [paired_steps(path, "retro w=2") for path in (first, second)]
    base = [t for b, _ in pairs for t in b]
    retro = [t for _, r in pairs for t in r]
    assert base == [100.0, 100.0, 50.0] and retro == [104.0, 106.0, 52.0]
    assert pooled_overhead(base, retro)[0] == pytest.approx(100 * 4 / 100)
    uneven = run_file(tmp_path / "c.json", [100.0, 100.0], [104.0])
    with pytest.raises(ValueError, match="2 base steps against 1"):
        paired_steps(uneven, "retro w=2")
