"""Resolving where the daemon listens and how to open a channel to it."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

DEFAULT_MAX_MESSAGE = 1024 * 1024 * 1024


def default_target() -> str:
    explicit = os.environ.get("KVD_TARGET")
    if explicit:
        return explicit
    socket = os.environ.get("KVD_SERVER_SOCKET")
    if not socket:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        socket = str(Path(runtime) / "kvd" / "kvd.sock") if runtime else f"/tmp/kvd-{os.getuid()}/kvd.sock"
    return f"unix://{socket}"


def normalize(target: str | None) -> str:
    target = target or default_target()
    if target.startswith("/"):
        return f"unix://{target}"
    return target


def is_local(target: str) -> bool:
    """True when the daemon shares this host (Unix socket or loopback TCP), so shared memory can work."""
    if target.startswith("unix:"):
        return True
    host = target.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_options(max_message: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message), ("grpc.max_send_message_length", max_message)]
