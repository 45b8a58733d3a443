"""Shared fixtures: a real kvd daemon in a subprocess on a temporary socket (and a loopback TCP port)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape_metrics(port: int) -> str:
    """The Prometheus text of a daemon started with server.metrics=127.0.0.1:<port>."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


class DaemonProcess:
    """A kvd daemon run as `python -m kvd serve`, restartable on the same socket and data directory."""

    def __init__(self, workdir: Path, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 tcp: bool = True) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "kvd.sock")
        self.data_dir = str(workdir / "data")
        self.port = free_port() if tcp else None
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "daemon.log"

    @property
    def target(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_target(self) -> str:
        assert self.port is not None
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "kvd", "serve", "--socket", self.socket, "--data-dir", self.data_dir,
               "--log-format", "text", "--set", "server.workers=2"]
        if self.port is not None:
            cmd += ["--tcp", f"127.0.0.1:{self.port}", "--set", "server.allow_insecure_tcp=true"]
        return cmd + self.extra_args

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon writes it for its whole life
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        self.wait_serving(timeout)
        return self

    def wait_serving(self, timeout: float) -> None:
        from kvd_client import KvdClient, KvdError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    with KvdClient(self.target, shm=False, timeout=2) as probe:
                        if probe.health() == "SERVING":
                            return
                except KvdError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **options):
        from kvd_client import KvdClient

        return KvdClient(self.target, **options)

    def tcp_client(self, **options):
        from kvd_client import KvdClient

        return KvdClient(self.tcp_target, **options)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> DaemonProcess:
        self.stop()
        return self.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    started: list[DaemonProcess] = []

    def make(extra_args: list[str] | None = None, env: dict[str, str] | None = None, tcp: bool = True,
             subdir: str = "d") -> DaemonProcess:
        workdir = tmp_path / subdir
        workdir.mkdir(exist_ok=True)
        daemon = DaemonProcess(workdir, extra_args, env, tcp)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator:
    """The daemon's engine in this process (a real LMDB data dir, index pool and tiering), started and closed."""
    from kvd.config import load
    from kvd.engine import Engine

    started = Engine(load(overrides={"storage.data_dir": str(tmp_path)}, environ={}))
    started.start()
    yield started
    started.close()


@pytest.fixture
def kvd_daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for a whole test module (tests must use their own session ids)."""
    daemon = DaemonProcess(tmp_path_factory.mktemp("kvd"))
    daemon.start()
    yield daemon
    daemon.stop()
