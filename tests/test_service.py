"""Running kvd as a service: CLI, systemd notify protocol, Prometheus metrics, tokens and tenant isolation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from kvd_client import KvdClient, NotFoundError, UnauthenticatedError

from tests.conftest import ROOT, free_port, scrape_metrics


def kvd_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvd", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_tables_json_and_exit_codes(kvd_daemon, tmp_path):
    client = kvd_daemon.client()
    client.create_session("cli-a", num_layers=1, num_kv_heads=1, head_dim=8, pinned=True)
    client.append("cli-a", 0, torch.ones(1, 1, 10, 8).half(), torch.ones(1, 1, 10, 8).half())
    client.close()
    target = ["--target", kvd_daemon.target]
    listed = kvd_cli("ls", *target)
    assert listed.returncode == 0 and "cli-a" in listed.stdout and "SESSION" in listed.stdout
    rows = json.loads(kvd_cli("ls", "--json", *target).stdout)
    assert rows[0]["session_id"] == "cli-a" and rows[0]["num_tokens"] == 10 and rows[0]["pinned"]
    shown = kvd_cli("show", "cli-a", *target)
    assert shown.returncode == 0 and "cli-a" in shown.stdout and "10 (0 durable)" in shown.stdout
    assert json.loads(kvd_cli("show", "cli-a", "--json", *target).stdout)["num_tokens"] == 10
    assert kvd_cli("show", "nobody", *target).returncode == 4
    client = kvd_daemon.client()
    client.create_session("cli-g", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", index="graph")
    client.append("cli-g", 0, torch.randn(1, 1, 300, 8), torch.randn(1, 1, 300, 8))
    client.retrieve("cli-g", 0, torch.randn(1, 8), k=4)  # the first query of a layer starts its index build
    client.close()
    graph = kvd_cli("show", "cli-g", *target).stdout
    assert "LAYER" in graph and "FROM HINTS" in graph and "graph" in graph
    stats = json.loads(kvd_cli("stats", "--json", *target).stdout)
    assert stats["sessions"] == 2
    assert kvd_cli("health", *target).stdout.strip() == "SERVING"
    exported = tmp_path / "cli-a.kvd"
    assert kvd_cli("export", "cli-a", str(exported), *target).returncode == 0
    assert kvd_cli("rm", "cli-a", *target).returncode == 0
    assert kvd_cli("rm", "cli-a", *target).returncode == 4
    imported = kvd_cli("import", str(exported), "--json", *target)
    assert json.loads(imported.stdout) == {"session": "cli-a", "tokens": 10}
    gone = kvd_cli("ls", "--target", f"unix://{tmp_path}/none.sock", "--timeout", "2")
    assert gone.returncode == 3 and "kvd:" in gone.stderr


def test_systemd_notify_protocol(daemon_factory, tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    listener.bind(path)
    listener.settimeout(30)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    daemon = daemon_factory(env=env, tcp=False)

    def next_messages() -> list[str]:
        return listener.recv(4096).decode().split("\n")

    seen: list[str] = []
    while "READY=1" not in seen:
        seen += next_messages()
    assert os.path.exists(daemon.socket), "READY=1 only after the socket is bound"
    assert any(m.startswith("STATUS=recovering") for m in seen), seen
    watchdog = 0
    while watchdog < 2:
        watchdog += next_messages().count("WATCHDOG=1")
    daemon.proc.send_signal(signal.SIGTERM)
    while "STOPPING=1" not in seen:
        seen += next_messages()
    assert daemon.proc.wait(30) == 0
    listener.close()


def test_prometheus_metrics_endpoint(daemon_factory):
    port = free_port()
    daemon = daemon_factory(["--set", f"server.metrics=127.0.0.1:{port}"], tcp=False)
    client = daemon.client()
    client.create_session("m", num_layers=1, num_kv_heads=1, head_dim=8)
    client.append("m", 0, torch.ones(1, 1, 10, 8).half(), torch.ones(1, 1, 10, 8).half())
    client.retrieve("m", 0, torch.ones(1, 8), k=3)
    client.retrieve("m", 0, torch.ones(1, 8), k=3, mode="ids")
    with contextlib.suppress(NotFoundError):
        client.get_session("missing")
    client.close()
    body = scrape_metrics(port)
    assert 'kvd_sessions{tier="memory"} 1' in body
    assert 'kvd_retrieve_duration_seconds_count{mode="attention",index_kind="flat"} 1' in body
    assert 'kvd_retrieve_duration_seconds_count{mode="ids",index_kind="flat"} 1' in body
    assert 'kvd_rpc_errors_total{method="kvd.v1.Kvd/GetSession",code="NOT_FOUND"} 1' in body
    assert 'kvd_append_bytes_total{transport="shm"} 320' in body
    assert "kvd_tier_budget_bytes" in body and "kvd_spills_total" in body


@pytest.fixture
def token_daemon(daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token-0123456789\nbob bob-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    port = free_port()
    daemon = daemon_factory(["--tcp", f"127.0.0.1:{port}", "--set", f"server.token_file={tokens}"], tcp=False)
    daemon.port = port
    return daemon


def test_tcp_needs_a_token_and_tenants_are_isolated(token_daemon):
    from kvd_client import KvdError

    anonymous = KvdClient(token_daemon.tcp_target, shm=False, timeout=10)
    with pytest.raises(UnauthenticatedError):
        anonymous.list_sessions()
    wrong = KvdClient(token_daemon.tcp_target, shm=False, token="not-a-valid-token-at-all", timeout=10)
    with pytest.raises(UnauthenticatedError):
        wrong.stats()
    alice = KvdClient(token_daemon.tcp_target, shm=False, token="alice-token-0123456789", timeout=10)
    bob = KvdClient(token_daemon.tcp_target, shm=False, token="bob-token-0123456789abcdef", timeout=10)
    alice.create_session("secret", num_layers=1, num_kv_heads=1, head_dim=8)
    alice.append("secret", 0, torch.ones(1, 1, 4, 8).half(), torch.ones(1, 1, 4, 8).half())
    assert [s.session_id for s in bob.list_sessions()] == []
    for attempt in (lambda: bob.get_session("secret"), lambda: bob.fetch("secret", 0, 4),
                    lambda: bob.retrieve("secret", 0, torch.ones(1, 8), k=1), lambda: bob.delete_session("secret")):
        with pytest.raises(NotFoundError):
            attempt()
    bob.create_session("secret", num_layers=1, num_kv_heads=1, head_dim=8)   # same name, own namespace
    assert alice.get_session("secret").num_tokens == 4
    assert bob.get_session("secret").num_tokens == 0
    local = token_daemon.client(shm=False)          # the Unix socket without a token: the default tenant
    assert [s.session_id for s in local.list_sessions()] == []
    for c in (anonymous, wrong, alice, bob, local):
        c.close()
    assert isinstance(UnauthenticatedError, type) and issubclass(UnauthenticatedError, KvdError)


def test_group_readable_token_file_is_refused(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token-0123456789\n")
    tokens.chmod(0o644)
    result = kvd_cli("serve", "--socket", str(tmp_path / "s.sock"), "--data-dir", str(tmp_path / "d"),
                     "--set", f"server.token_file={tokens}")
    assert result.returncode == 1
    assert "permission" in result.stderr.lower() or "0644" in result.stderr or "readable" in result.stderr


def test_shared_memory_released_when_the_client_goes_away(kvd_daemon):
    code = (f"from kvd_client import KvdClient; import torch, os; c = KvdClient({kvd_daemon.target!r}, shm=True); "
            "c.create_session('gone-client', num_layers=1, num_kv_heads=1, head_dim=8); "
            "c.append('gone-client', 0, torch.ones(1,1,4,8).half(), torch.ones(1,1,4,8).half()); "
            "print(c._transport.name, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    region = out.stdout.strip()
    assert region
    client = kvd_daemon.client(shm=False)
    deadline = time.time() + 20
    while client.stats().shared_memory_regions and time.time() < deadline:
        time.sleep(0.2)
    assert client.stats().shared_memory_regions == 0
    assert not os.path.exists(f"/dev/shm/{region}")
    client.close()
