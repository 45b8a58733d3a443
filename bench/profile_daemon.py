"""Profile the kvd daemon a benchmark starts: run the benchmark, attach py-spy to its daemon once the daemon is up,
record for a while (without pausing the daemon), and report where the samples inside a chosen frame went.
`--target bench` profiles the benchmark's own process instead (the client side, e.g. `--within _attend_retro`).

    python3 -m bench.profile_daemon --delay 40 --seconds 60 --within run_signalled -- \
        python3 bench/retro_bench.py --phases speed --windows 2 --interleave --index graph

The report counts, among the samples whose stack holds `--within` (a function name, e.g. the fast lane's
`run_signalled`), the share of each function on the stack (inclusive) and at its top (self), and writes the raw
stacks (py-spy's collapsed format) next to the JSON so that they can be read again without the device.
py-spy must be on PATH (the device carries its wheel in .whl/).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import markdown_table


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay", type=float, default=30.0, help="seconds after the daemon starts before recording")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds to record")
    p.add_argument("--rate", type=int, default=500, help="samples per second")
    p.add_argument("--within", default="run_signalled", help="report the samples whose stack holds this function")
    p.add_argument("--top", type=int, default=25, help="rows of the report")
    p.add_argument("--exclude", default="_compile_for_args",
                   help="leave out the samples whose stack holds this function (default: numba compiling)")
    p.add_argument("--native", action="store_true", help="also sample native frames (numba kernels show as such)")
    p.add_argument("--idle", action="store_true",
                   help="also sample threads off the CPU (waiting for the GIL, a lock or the socket)")
    p.add_argument("--target", choices=("daemon", "bench"), default="daemon",
                   help="the process to profile: the daemon, or the benchmark itself (the client's side)")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/profile_daemon.json or bench/results/)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the benchmark command, after --")
    args = p.parse_args()
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("give the benchmark command after --")
    return args


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                found.append(kid)
                frontier.append(kid)
    return found


def find_daemon(bench: subprocess.Popen, timeout: float) -> int:
    """The pid of the `kvd serve` process started by the benchmark."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bench.poll() is not None:
            raise RuntimeError(f"the benchmark exited ({bench.returncode}) before its daemon was found")
        for pid in children(bench.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"kvd" in cmdline and b"serve" in cmdline:
                return pid
        time.sleep(0.2)
    raise TimeoutError("no kvd daemon appeared")


def frame_name(frame: str) -> str:
    """'fill_packed (kvd/retro.py:312)' -> 'fill_packed (kvd/retro.py)': lines of one function count together."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("/kvd/", "/kvd_client/", "/kvd_transformers/", "/site-packages/", "/lib/python"):
        if marker in path:
            path = path[path.index(marker) + 1:]
            break
    return f"{name} ({path})" if path else name


def _position(names: list[str], function: str) -> int | None:
    """Where `function` (a name, or its last dotted part) first appears in a stack's names."""
    return next((i for i, name in enumerate(names) if name == function or name.endswith("." + function)), None)


def summarize(raw: str, within: str, exclude: str, top: int) -> tuple[int, int, list[dict], list[dict]]:
    """(all samples, samples within `within` and not in `exclude`, rows of inclusive and self shares of functions
    within it, rows of the self shares of single lines)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    own_line: Counter[str] = Counter()
    total = inside = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        raw_frames = stack.split(";")
        frames = [frame_name(f) for f in raw_frames]
        names = [f.split(" (")[0] for f in frames]
        at = _position(names, within)
        if at is None or (exclude and _position(names, exclude) is not None):
            continue
        inside += count
        below = frames[at:]
        for frame in set(below):
            inclusive[frame] += count
        own[below[-1]] += count
        leaf = raw_frames[-1]
        own_line[f"{frame_name(leaf).split(' (')[0]} line {leaf.rsplit(':', 1)[-1].rstrip(')')}"] += count
    share = 100 / max(inside, 1)
    rows = [{"function": f, "inclusive_pct": round(n * share, 1), "self_pct": round(own[f] * share, 1)}
            for f, n in inclusive.most_common(top)]
    lines = [{"line": f, "self_pct": round(n * share, 1)} for f, n in own_line.most_common(top)]
    return total, inside, rows, lines


def main() -> None:
    args = parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not on PATH")
    out = Path(args.out or os.path.join(os.environ.get("OUT", "bench/results"), "profile_daemon.json"))
    raw_path = out.with_suffix(".stacks.txt")  # gzipped once read: the file comes back from the device
    bench = subprocess.Popen(args.command)
    try:
        daemon = find_daemon(bench, 300.0)
        target = daemon if args.target == "daemon" else bench.pid
        print(f"daemon pid {daemon}; recording pid {target} in {args.delay:.0f} s for {args.seconds:.0f} s",
              flush=True)
        time.sleep(args.delay)
        cmd = [spy, "record", "--pid", str(target), "--nonblocking", "--threads", "--format", "raw",
               "--rate", str(args.rate), "--duration", str(int(args.seconds)), "--output", str(raw_path)]
        if args.native:
            cmd.append("--native")
        if args.idle:
            cmd.append("--idle")
        spied = subprocess.run(cmd, capture_output=True, text=True)
        if spied.returncode != 0:
            print(spied.stderr[-2000:], file=sys.stderr)
        code = bench.wait()
    finally:
        if bench.poll() is None:
            bench.terminate()
    raw = raw_path.read_text() if raw_path.exists() else ""
    if raw:
        with gzip.open(f"{raw_path}.gz", "wt") as packed:
            packed.write(raw)
        raw_path.unlink()
    total, inside, rows, lines = summarize(raw, args.within, args.exclude, args.top)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": args.command, "target": args.target, "delay_s": args.delay,
                               "seconds": args.seconds, "rate": args.rate, "within": args.within, "samples": total,
                               "samples_within": inside, "exclude": args.exclude, "bench_exit": code, "rows": rows,
                               "lines": lines}, indent=1))
    print(f"\n{inside} of {total} samples within {args.within}; raw stacks: {raw_path}.gz")
    print(markdown_table(lines, [("line", "line"), ("self_pct", "self %")]) + "\n")
    print(markdown_table(rows, [("function", "function"), ("inclusive_pct", "inclusive %"), ("self_pct", "self %")]))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
