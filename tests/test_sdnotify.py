"""sd_notify protocol against a real NOTIFY_SOCKET datagram listener (path and abstract sockets)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from kvd import sdnotify


class Listener:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return messages


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
        env = address
    else:
        name = f"kvd-test-notify-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name)
        env = "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", env)
    try:
        yield Listener(sock)
    finally:
        sock.close()


def test_messages(listener: Listener) -> None:
    assert sdnotify.ready()
    assert listener.recv() == "READY=1"
    assert sdnotify.watchdog_ping()
    assert listener.recv() == "WATCHDOG=1"
    assert sdnotify.status("recovered 3 sessions\nserving")
    assert listener.recv() == "STATUS=recovered 3 sessions serving"
    assert sdnotify.stopping("draining")
    assert listener.recv() == "STOPPING=1\nSTATUS=draining"
    assert sdnotify.extend_timeout(2.5)
    assert listener.recv() == "EXTEND_TIMEOUT_USEC=2500000"
    assert sdnotify.notify("RELOADING=1")
    assert listener.recv() == "RELOADING=1"


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sdnotify.watchdog_ping() is False


def test_dead_socket_returns_false(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.ready() is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for bad in ("0", "-5", "soon", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


def test_watchdog_loop_pings_only_while_healthy(listener: Listener) -> None:
    healthy = {"value": True}

    def is_healthy() -> bool:
        if healthy["value"] is None:
            raise RuntimeError("probe broke")
        return healthy["value"]

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        task = asyncio.create_task(sdnotify.watchdog_loop(0.1, is_healthy))  # pings every 50 ms
        await asyncio.sleep(0.27)
        first = listener.drain()
        healthy["value"] = False
        await asyncio.sleep(0.06)  # let an in-flight period finish
        listener.drain()
        await asyncio.sleep(0.25)
        second = listener.drain()
        healthy["value"] = None  # a raising probe counts as unhealthy
        await asyncio.sleep(0.06)
        listener.drain()
        await asyncio.sleep(0.2)
        third = listener.drain()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert 2 <= len(first) <= 7 and set(first) == {"WATCHDOG=1"}  # ~6 at 50 ms; slack for a busy CI
    assert second == []
    assert third == []


def test_watchdog_loop_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(sdnotify.watchdog_loop(0, lambda: True))
