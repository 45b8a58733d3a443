"""bench/profile_daemon.py's report from py-spy's collapsed stacks (the recording itself needs py-spy and a
daemon: it is exercised on the benchmark machines)."""

from __future__ import annotations

from bench.profile_daemon import frame_name, summarize

STACKS = "\n".join([
    "thread (0x1): kvd-fast;_serve (/x/kvd/fastlane.py:92);ConnectionPlans.run_signalled (/x/kvd/prepared.py:180);"
    "ConnectionPlans.run (/x/kvd/prepared.py:156);search_attend (/x/kvd/index/graph.py:411) 70",
    "thread (0x1): kvd-fast;_serve (/x/kvd/fastlane.py:92);ConnectionPlans.run_signalled (/x/kvd/prepared.py:180);"
    "ConnectionPlans.run (/x/kvd/prepared.py:160);fill_packed (/x/kvd/retro.py:457) 20",
    "thread (0x1): kvd-fast;_serve (/x/kvd/fastlane.py:92);ConnectionPlans.run_signalled (/x/kvd/prepared.py:180);"
    "search_attend (/x/kvd/index/graph.py:411);_compile_for_args (/usr/lib/python3/numba/core/dispatcher.py:3) 500",
    "thread (0x1): kvd-fast;_serve (/x/kvd/fastlane.py:92);ConnectionPlans.run_signalled (/x/kvd/prepared.py:180);"
    "ConnectionPlans.run (/x/kvd/prepared.py:160);fill_packed (/x/kvd/retro.py:458) 10",
    "thread (0x2): kvd-fast;_serve (/x/kvd/fastlane.py:92);recv_exact (/x/kvd_client/fastlane.py:68) 400",
    "not a sample line",
])


def test_frame_names_drop_line_numbers_and_install_prefixes() -> None:
    assert frame_name("fill_packed (/opt/x/kvd/retro.py:457)") == "fill_packed (kvd/retro.py)"
    assert frame_name("poll (/usr/lib/python3.12/site-packages/grpc/_server.py:9)") \
        == "poll (site-packages/grpc/_server.py)"
    assert frame_name("thread (0x1): kvd-fast") == "thread (0x1)"


def test_summary_counts_the_samples_within_a_frame_without_the_excluded() -> None:
    total, inside, rows, lines = summarize(STACKS, "run_signalled", "_compile_for_args", 10)
    assert (total, inside) == (1000, 100)  # the compile and the socket wait are left out
    by_function = {row["function"]: row for row in rows}
    assert by_function["ConnectionPlans.run_signalled (kvd/prepared.py)"]["inclusive_pct"] == 100.0
    assert by_function["search_attend (kvd/index/graph.py)"] == {
        "function": "search_attend (kvd/index/graph.py)", "inclusive_pct": 70.0, "self_pct": 70.0}
    assert by_function["fill_packed (kvd/retro.py)"]["self_pct"] == 30.0
    assert "_serve (kvd/fastlane.py)" not in by_function  # above the frame: not counted
    assert {row["line"]: row["self_pct"] for row in lines} == {
        "search_attend line 411": 70.0, "fill_packed line 457": 20.0, "fill_packed line 458": 10.0}


def test_a_qualified_name_matches_only_that_method() -> None:
    _, inside, _, _ = summarize(STACKS, "ConnectionPlans.run", "", 10)
    assert inside == 100  # the compile sample has run_signalled on its stack, not run
    _, inside, _, _ = summarize(STACKS, "Thread.run", "", 10)
    assert inside == 0
    _, inside, _, _ = summarize(STACKS, "run_signalled", "", 10)
    assert inside == 600
