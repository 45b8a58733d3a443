"""A watch over split prepared runs whose daemon went away before storing their signal word.

A device stream may be waiting on a started run's signal word (kvd_transformers.launch_ahead), and the thread that
would read the reply may itself be stuck in a CUDA call that waits for that stream (a lazily loaded kernel, the
caching allocator releasing memory). If the daemon dies mid-run, nobody would ever store the word. One thread per
process polls the connections of pending runs for a hang-up and stores their words then; finish() afterwards finds
the connection lost and raises or runs again.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

POLL_SECONDS = 0.2
_HANG_UP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


class SignalWatch:
    """Pending runs by key: (the connection's socket, what stores the run's signal)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[socket.socket, Callable[[], None]]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, key: int, sock: socket.socket, store: Callable[[], None]) -> None:
        with self._lock:
            self._pending[key] = (sock, store)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="kvd-signal-watch", daemon=True)
                self._thread.start()
        self._wake.set()

    def forget(self, key: int) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def _loop(self) -> None:
        while True:
            with self._lock:
                pending = list(self._pending.items())
                if not pending:
                    self._wake.clear()  # under the lock: a watch() after this sets it again
            if not pending:
                self._wake.wait()
                continue
            for key, (sock, store) in pending:
                if _hung_up(sock):
                    with self._lock:
                        if self._pending.pop(key, None) is None:
                            continue  # finished meanwhile
                    store()
            time.sleep(POLL_SECONDS)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed the connection (or it failed), without reading from it."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), _HANG_UP)
        return any(events & _HANG_UP for _, events in poller.poll(0))
    except (OSError, ValueError):  # closed here meanwhile: its reader knows
        return False


WATCH = SignalWatch()
