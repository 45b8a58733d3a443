"""`kvd` command line: serve the daemon, or talk to a running one."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kvd import __version__
from kvd.config import ConfigError, load

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND = 0, 1, 2, 3, 4


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.set_defaults(func=cmd_serve)
    serve.add_argument("--config", help="TOML config file (default: embedded defaults, or $KVD_CONFIG)")
    serve.add_argument("--socket", help="Unix socket path")
    serve.add_argument("--tcp", help="also listen on host:port")
    serve.add_argument("--data-dir", help="directory of the LMDB disk tier")
    serve.add_argument("--memory-budget", help="bytes of KV + indexes kept in RAM (e.g. 8GiB)")
    serve.add_argument("--disk-budget", help="bytes of the disk tier (e.g. 100GiB)")
    serve.add_argument("--log-level", help="debug, info, warning, error")
    serve.add_argument("--log-format", choices=["json", "text"])
    serve.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="set any config key, e.g. --set index.default_kind=graph")


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    mapping = {"socket": "server.socket", "tcp": "server.tcp", "data_dir": "storage.data_dir",
               "memory_budget": "storage.memory_budget", "disk_budget": "storage.disk_budget",
               "log_level": "log.level", "log_format": "log.format"}
    overrides = {key: getattr(args, attr) for attr, key in mapping.items() if getattr(args, attr) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return overrides


def cmd_serve(args: argparse.Namespace) -> int:
    # Before torch is imported: one OpenMP thread per worker thread (see kvd.server.Daemon).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    try:
        config = load(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"kvd: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Before numba is imported: it sizes its thread pool once, at import (default: one thread per core).
    if config.server.region_threads:
        os.environ["NUMBA_NUM_THREADS"] = str(config.server.region_threads)
    from kvd import logs
    from kvd.auth import TokenFileError
    from kvd.server import StartupError, serve
    from kvd.store.disk import FormatError

    logs.setup(config.log.level, config.log.format)
    # Compiled kernels are cached beside their sources; next to the data when those are read-only.
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if not all(os.access(os.path.join(package_dir, sub), os.W_OK) for sub in ("", "index")):
        os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(config.storage.data_dir, "numba-cache"))
    try:
        serve(config)
    except (StartupError, TokenFileError, FormatError, OSError) as exc:
        logging.getLogger("kvd").error(str(exc))
        return EXIT_ERROR
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvd", description="Tiered KV-cache storage daemon")
    parser.add_argument("--version", action="version", version=f"kvd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    from kvd import cli_client

    cli_client.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))
