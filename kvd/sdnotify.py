"""A tiny sd_notify(3) client: readiness, status, stopping and watchdog for Type=notify units.

No python-systemd dependency: the protocol is one AF_UNIX datagram of newline-separated KEY=VALUE
assignments sent to $NOTIFY_SOCKET, an absolute path or an abstract socket written with a leading '@'.
Outside systemd ($NOTIFY_SOCKET unset) every call is a cheap no-op returning False, so the daemon calls
these unconditionally.

Use from the daemon:
    sdnotify.ready()                       # after the socket is bound and durable sessions are recovered
    interval = sdnotify.watchdog_interval()
    if interval:
        task = asyncio.create_task(sdnotify.watchdog_loop(interval, is_healthy))
    ...
    sdnotify.stopping()                    # first thing on SIGTERM/SIGINT
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

__all__ = [
    "extend_timeout",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_loop",
    "watchdog_ping",
]

_log = logging.getLogger(__name__)

# A notification must never stall the event loop for long, even if the receiver's queue is full.
_SEND_TIMEOUT_S = 0.5


def _address(path: str) -> str:
    if path.startswith("@"):
        return "\0" + path[1:]  # Linux abstract namespace
    return path


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", or several assignments separated by newlines) to $NOTIFY_SOCKET.

    Returns True if the datagram was sent, False when not running under a notify-aware supervisor or
    when sending failed (failures are logged at debug level, never raised)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return False  # unset, or a transport we do not speak (e.g. vsock:)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto(state.encode(), _address(path))
        return True
    except OSError as exc:
        _log.debug("sd_notify %r to %s failed: %s", state, path, exc)
        return False


def ready(status_text: str | None = None) -> bool:
    """READY=1 — only once the service really answers (socket bound, durable sessions recovered)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1 — the daemon begins its graceful shutdown."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def watchdog_ping() -> bool:
    """WATCHDOG=1 — keep-alive; systemd kills and restarts the unit if these stop for WatchdogSec."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """STATUS=<text> — the one-line status `systemctl status kvd` shows."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """EXTEND_TIMEOUT_USEC — ask for more start/stop time (e.g. while recovering many sessions)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")


def _one_line(text: str) -> str:
    return " ".join(text.split())  # the protocol is newline-separated


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds (WatchdogSec) if systemd expects pings from this process, else None.

    Reads WATCHDOG_USEC, honouring WATCHDOG_PID (if set, it must be our pid)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


async def watchdog_loop(interval: float, is_healthy: Callable[[], bool]) -> None:
    """Ping the watchdog every interval/2 seconds while `is_healthy()` returns True; run until cancelled.

    `interval` is the full watchdog timeout (what watchdog_interval() returns). When is_healthy() returns
    False or raises, that ping is skipped, so a wedged daemon gets restarted by systemd. Because the loop
    runs on the event loop, a blocked loop also stops the pings — which is the point."""
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, not {interval!r}")
    period = interval / 2
    while True:
        try:
            healthy = bool(is_healthy())
        except Exception:
            _log.exception("watchdog health check raised; skipping the ping")
            healthy = False
        if healthy:
            watchdog_ping()
        else:
            _log.warning("daemon unhealthy; withholding the watchdog ping")
        await asyncio.sleep(period)
