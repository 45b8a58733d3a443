"""A kvd daemon started in a subprocess for the benchmarks (a private data directory and unix socket)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT / "client", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from kvd_client import KvdClient  # noqa: E402


class Daemon:
    """`python -m kvd serve` on a socket in a fresh temporary directory; waits until it reports SERVING."""

    def __init__(self, memory_budget: str | None = None, index: str | None = None,
                 extra_args: Sequence[str] = (), start_timeout: float = 120.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="kvd-bench-")
        self.socket = os.path.join(self.dir, "kvd.sock")
        cmd = [sys.executable, "-m", "kvd", "serve", "--socket", self.socket, "--data-dir",
               os.path.join(self.dir, "data"), "--log-format", "text", "--log-level", "warning"]
        if memory_budget:
            cmd += ["--memory-budget", memory_budget]
        if index:
            cmd += ["--set", f"index.default_kind={index}"]
        cmd += list(extra_args)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client"),
                                                           os.environ.get("PYTHONPATH", "")])}
        self.log = open(os.path.join(self.dir, "daemon.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.target = f"unix://{self.socket}"
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_text()}")
            if os.path.exists(self.socket):
                try:
                    with KvdClient(self.target, shm=False, timeout=2) as probe:
                        if probe.health() == "SERVING":
                            return
                except Exception:
                    pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(self.log_text())

    def log_text(self) -> str:
        return Path(self.dir, "daemon.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
