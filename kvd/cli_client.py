"""`kvd` subcommands that talk to a running daemon: ls, show, stats, rm, health, export, import.

Tables for people, --json for scripts. Exit codes: 0 ok, 1 other error, 3 daemon unavailable, 4 not found,
5 not serving (health).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

EXIT_OK, EXIT_ERROR, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_NOT_SERVING = 0, 1, 3, 4, 5


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _client(args: argparse.Namespace):
    from kvd_client import KvdClient

    token = args.token or os.environ.get("KVD_TOKEN")
    if token is None and args.token_file:
        token = Path(args.token_file).read_text().strip()
    return KvdClient(args.target, shm=False, token=token, timeout=args.timeout)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sessions = client.list_sessions(args.prefix)
    if args.json:
        _print_json([{**asdict(s), "dtype": str(s.dtype).removeprefix("torch.")} for s in sessions])
        return EXIT_OK
    rows = [[s.session_id, str(s.num_tokens), str(s.durable_tokens), s.state, s.tier, s.index_kind,
             _human(s.memory_bytes), _human(s.disk_bytes), "yes" if s.pinned else ""] for s in sessions]
    print(_table(rows, ["SESSION", "TOKENS", "DURABLE", "STATE", "TIER", "INDEX", "MEMORY", "DISK", "PINNED"]))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """One session in full, with its layers' indexes (and why a layer's index failed, if one did)."""
    with _client(args) as client:
        info = client.get_session(args.session)
    if args.json:
        _print_json({**asdict(info), "dtype": str(info.dtype).removeprefix("torch.")})
        return EXIT_OK
    rows = [["session", info.session_id], ["tokens", f"{info.num_tokens} ({info.durable_tokens} durable)"],
            ["state", f"{info.state}, {info.tier}"], ["memory", _human(info.memory_bytes)],
            ["disk", _human(info.disk_bytes)], ["index", info.index_kind or "flat"]]
    print(_table(rows, ["FIELD", "VALUE"]))
    if info.indexes:
        layers = [[str(i["layer"]), i["kind"], "yes" if i["ready"] else "no", str(i["indexed_tokens"]),
                   _human(i["bytes"]), "yes" if i["from_hints"] else "no", i["error"]] for i in info.indexes]
        print()
        print(_table(layers, ["LAYER", "KIND", "READY", "TOKENS", "BYTES", "FROM HINTS", "ERROR"]))
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    if args.json:
        _print_json(asdict(stats))
        return EXIT_OK
    rows = [["version", stats.version], ["uptime", f"{stats.uptime_seconds:.0f} s"],
            ["sessions", f"{stats.sessions} ({stats.sessions_in_memory} in memory, {stats.sessions_on_disk} on disk)"],
            ["memory", f"{_human(stats.memory_bytes)} of {_human(stats.memory_budget_bytes)}"],
            ["disk", f"{_human(stats.disk_bytes)} of "
                     f"{_human(stats.disk_budget_bytes) if stats.disk_budget_bytes else 'unlimited'}"],
            ["shared-memory regions", str(stats.shared_memory_regions)],
            ["index build queue", str(stats.index_build_queue)]]
    rows += [[name, f"{value:g}"] for name, value in sorted(stats.counters.items())]
    print(_table(rows, ["STAT", "VALUE"]))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        freed = [client.delete_session(sid) for sid in args.session]
    if args.json:
        _print_json([{"session": sid, "freed_memory_bytes": r.freed_memory_bytes,
                      "freed_disk_bytes": r.freed_disk_bytes} for sid, r in zip(args.session, freed, strict=True)])
    else:
        for sid, reply in zip(args.session, freed, strict=True):
            print(f"deleted {sid}: freed {_human(reply.freed_memory_bytes)} of memory, "
                  f"{_human(reply.freed_disk_bytes)} of disk")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    print(json.dumps({"status": status}) if args.json else status)
    return EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING


def cmd_export(args: argparse.Namespace) -> int:
    target = Path(args.file)
    partial = target.with_name(target.name + ".partial")
    written = 0
    with _client(args) as client, open(partial, "wb") as out:
        for chunk in client.export_session(args.session):
            out.write(chunk)
            written += len(chunk)
    partial.replace(target)
    print(json.dumps({"session": args.session, "file": str(target), "bytes": written}) if args.json
          else f"exported {args.session} to {target} ({_human(written)})")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    data = Path(args.file).read_bytes()
    with _client(args) as client:
        info = client.import_session(data)
    print(json.dumps({"session": info.session_id, "tokens": info.num_tokens}) if args.json
          else f"imported {info.session_id} ({info.num_tokens} tokens)")
    return EXIT_OK


def _guard(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from kvd_client import KvdError

        try:
            return command(args)
        except KvdError as exc:
            print(f"kvd: {exc.details or exc.code.name}", file=sys.stderr)
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                return EXIT_UNAVAILABLE
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return EXIT_NOT_FOUND
            return EXIT_ERROR
        except OSError as exc:
            print(f"kvd: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return run


def add_commands(sub: argparse._SubParsersAction) -> None:
    def parser(name: str, help_text: str, command: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--target", help="unix:///path/kvd.sock or host:port (default: $KVD_TARGET or the default "
                                        "socket)")
        p.add_argument("--token", help="bearer token (or $KVD_TOKEN)", default=None)
        p.add_argument("--token-file", help="file holding the bearer token")
        p.add_argument("--timeout", type=float, default=30.0)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=_guard(command))
        return p

    ls = parser("ls", "list sessions", cmd_ls)
    ls.add_argument("prefix", nargs="?", default="")
    show = parser("show", "one session in full, with its layers' indexes", cmd_show)
    show.add_argument("session")
    parser("stats", "daemon statistics", cmd_stats)
    rm = parser("rm", "delete sessions from both tiers", cmd_rm)
    rm.add_argument("session", nargs="+")
    health = parser("health", "health check (exit 0 when serving)", cmd_health)
    health.add_argument("--service", default="")
    export = parser("export", "export a session to one file", cmd_export)
    export.add_argument("session")
    export.add_argument("file")
    imp = parser("import", "import a session from an exported file", cmd_import)
    imp.add_argument("file")
