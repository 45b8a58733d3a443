"""bench.retro_trace.split_steps: a device timeline split into busy, starved and waiting, checked by hand."""

from __future__ import annotations

import pytest

from bench.retro_trace import STEP_PREFIX, split_steps, summarize


def _op(cat: str, name: str, ts: float, dur: float, corr: int) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts: float, dur: float, corr: int) -> dict:
    return _op("cuda_runtime", "cudaLaunchKernel", ts, dur, corr)


def test_a_step_splits_into_busy_starved_and_waiting() -> None:
    events = [
        {"ph": "X", "cat": "user_annotation", "name": f"{STEP_PREFIX}retro w=2 7", "ts": 1000.0, "dur": 1000.0},
        # launched at 1000-1010, runs 1020-1120: 20 us idle before it, 10 of them starved, 10 waiting (latency)
        _launch(1000.0, 10.0, 1), _op("kernel", "sm90_xmma_gemm_bf16", 1020.0, 100.0, 1),
        # launched long before, starts 380 us after the previous end: all waiting (a stream wait on kvd)
        _launch(1050.0, 5.0, 2), _op("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 1500.0, 50.0, 2),
        # overlaps the copy's end (another stream): only its tail counts as busy
        _launch(1060.0, 5.0, 3), _op("kernel", "elementwise", 1540.0, 60.0, 3),
        # launched after the device went idle: 1600 -> 1700 starved (launch ends at 1700), 1700 -> 1710 waiting
        _launch(1690.0, 10.0, 4), _op("kernel", "reduce", 1710.0, 90.0, 4),
        # outside the step: ignored
        _launch(2100.0, 5.0, 5), _op("kernel", "after", 2110.0, 10.0, 5),
    ]
    (row,) = split_steps(events)
    assert row["variant"] == "retro w=2" and row["step"] == 7
    assert row["wall_ms"] == pytest.approx(1.0)
    assert row["gemm_ms"] == pytest.approx(0.100)
    assert row["copy_ms"] == pytest.approx(0.050)
    assert row["kernel_ms"] == pytest.approx(0.050 + 0.090)
    assert row["busy_ms"] == pytest.approx(0.290)
    assert row["starved_ms"] == pytest.approx(0.010 + 0.100)
    assert row["waiting_ms"] == pytest.approx(0.010 + 0.380 + 0.010)
    assert row["tail_ms"] == pytest.approx(0.200)
    assert row["device_ops"] == 4
    total = row["busy_ms"] + row["starved_ms"] + row["waiting_ms"] + row["tail_ms"]
    assert total == pytest.approx(row["wall_ms"])


def test_summary_gives_each_variant_its_median_and_the_difference_to_base() -> None:
    rows = [{"variant": v, "step": i, "wall_ms": w, "busy_ms": 1.0, "gemm_ms": 0.5, "kernel_ms": 0.4,
             "copy_ms": 0.1, "starved_ms": s, "waiting_ms": 2.0, "tail_ms": 0.0, "device_ops": 10}
            for v, i, w, s in [("base", 0, 10.0, 1.0), ("base", 1, 12.0, 3.0), ("base", 2, 11.0, 2.0),
                               ("retro w=2", 0, 13.0, 4.0), ("retro w=2", 1, 12.0, 2.0), ("retro w=2", 2, 20.0, 3.0)]]
    got = {r["variant"]: r for r in summarize(rows)}
    assert got["base"]["wall_ms"] == 11.0 and got["retro w=2"]["wall_ms"] == 13.0
    assert got["retro w=2 - base"]["wall_ms"] == pytest.approx(2.0)
    assert got["retro w=2 - base"]["starved_ms"] == pytest.approx(1.0)
    assert got["retro w=2 - base"]["device_ops"] == 0


def test_frame_split_gives_the_innermost_function_its_wall_and_starved_time() -> None:
    """Python calls nested on the model's thread: each span of the step goes to the innermost function whose name
    matches (time outside any to "<outside>"), and the starved intervals are split the same way."""
    from bench.retro_trace import frame_split, frame_table

    def call(name: str, ts: float, dur: float, tid: int = 1) -> dict:
        return {"ph": "X", "cat": "python_function", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def step(variant: str, ts: float) -> dict:
        return {"ph": "X", "cat": "user_annotation", "name": f"{STEP_PREFIX}{variant} 0", "ts": ts, "dur": 100.0,
                "tid": 1}

    events = [
        step("base", 0.0), call("/x/kvd_transformers/cache.py(1): attend", 10.0, 50.0),
        call("/x/torch/other.py(3): helper", 20.0, 10.0),  # not matched: its time stays with attend
        step("retro w=2", 200.0), call("/x/kvd_transformers/cache.py(1): attend", 210.0, 80.0),
        call("/x/kvd_transformers/retro.py(9): merge", 220.0, 30.0),
        call("/x/kvd_transformers/retro.py(9): merge", 230.0, 5.0, tid=2),  # another thread: ignored
    ]
    starved = [("base", 40.0, 70.0), ("retro w=2", 240.0, 260.0)]
    got = frame_split(events, starved, ("kvd_transformers",))
    assert got["base"]["cache.py: attend"] == {"cpu": 50.0, "starved": 20.0}
    assert got["base"]["<outside>"] == {"cpu": 50.0, "starved": 10.0}
    assert got["retro w=2"]["retro.py: merge"] == {"cpu": 30.0, "starved": 10.0}
    assert got["retro w=2"]["cache.py: attend"] == {"cpu": 50.0, "starved": 10.0}
    assert got["retro w=2"]["<outside>"] == {"cpu": 20.0, "starved": 0.0}
    rows = {r["frame"]: r for r in frame_table(got, {"base": 1, "retro w=2": 1})}
    assert rows["retro.py: merge"]["extra_cpu_us"] == 30.0 and rows["cache.py: attend"]["extra_starved_us"] == -10.0
