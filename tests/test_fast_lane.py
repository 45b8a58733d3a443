"""The fast lane (Retrieve/Append/Fetch over a plain Unix socket) against the real daemon: same results and
errors as gRPC, authentication per tenant, protocol errors, the connection limit, and shutdown."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from kvd_client import FailedPreconditionError, InvalidArgumentError, KvdClient, NotFoundError, UnauthenticatedError
from kvd_client.fastlane import HELLO, METHODS, FastLane, recv_frame, send_frame

from kvd.v1 import kvd_pb2 as pb
from tests.conftest import free_port, scrape_metrics

HEADS, KV_HEADS, DIM, TOKENS = 8, 2, 16, 300


def fill(client: KvdClient, session: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, KV_HEADS, TOKENS, DIM, generator=gen).half()
    values = torch.randn(2, KV_HEADS, TOKENS, DIM, generator=gen).half()
    client.create_session(session, num_layers=2, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM,
                          dtype=torch.float16)
    client.append(session, 0, keys[:, :, :200], values[:, :, :200])
    client.append(session, 200, keys[:, :, 200:], values[:, :, 200:])
    return keys, values


def brute_topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> list[set[int]]:
    group = HEADS // KV_HEADS
    return [set(torch.topk(keys[h // group].float() @ queries[h].float(), k).indices.tolist()) for h in range(HEADS)]


def test_fast_lane_gives_the_grpc_results(kvd_daemon):
    fast, slow = kvd_daemon.client(), kvd_daemon.client(fast_lane=False)
    keys, values = fill(fast, "s")                      # appended through the fast lane
    assert fast.uses_fast_lane and not slow.uses_fast_lane
    assert os.path.exists(kvd_daemon.socket + ".fast")
    queries = torch.randn(HEADS, DIM, generator=torch.Generator().manual_seed(1))
    a = fast.retrieve("s", 1, queries, k=20, mode="attention")
    b = slow.retrieve("s", 1, queries, k=20, mode="attention")
    assert torch.equal(a.ids, b.ids) and torch.equal(a.output, b.output) and torch.equal(a.lse, b.lse)
    assert [set(row.tolist()) for row in a.ids] == brute_topk(queries, keys[1], 20)
    kv = fast.retrieve("s", 0, queries, k=5, mode="ids_kv")
    group = HEADS // KV_HEADS
    for h in range(HEADS):
        assert torch.equal(kv.keys[h], keys[0, h // group, kv.ids[h]])
        assert torch.equal(kv.values[h], values[0, h // group, kv.ids[h]])
    fetched = fast.fetch("s", 10, 250)
    assert torch.equal(fetched.keys, keys[:, :, 10:250]) and torch.equal(fetched.values, values[:, :, 10:250])
    assert fast.uses_fast_lane
    fast.close()
    slow.close()


def test_fast_lane_errors_match_grpc(kvd_daemon):
    fast, slow = kvd_daemon.client(), kvd_daemon.client(fast_lane=False)
    fill(fast, "e")
    q = torch.ones(HEADS, DIM)
    for client in (fast, slow):
        with pytest.raises(NotFoundError, match="missing"):
            client.retrieve("missing", 0, q, k=3)
        with pytest.raises(InvalidArgumentError, match="layer"):
            client.retrieve("e", 7, q, k=3)
        with pytest.raises(FailedPreconditionError, match="must start at 300"):
            client.append("e", 5, torch.ones(2, KV_HEADS, 1, DIM).half(), torch.ones(2, KV_HEADS, 1, DIM).half())
    assert fast.uses_fast_lane, "a call's error leaves the connection usable"
    assert fast.retrieve("e", 0, q, k=3).counts == [3]
    fast.close()
    slow.close()


def raw_lane(path: str, token: str = "") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    send_frame(sock, HELLO, token.encode())
    assert recv_frame(sock, 1 << 20) == (0, bytearray())
    return sock


def test_protocol_errors_are_answered(kvd_daemon):
    path = kvd_daemon.socket + ".fast"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    send_frame(sock, METHODS["Retrieve"][0], b"")       # a request before the hello
    status, message = recv_frame(sock, 1 << 20)
    assert status == 3 and b"HELLO" in message           # INVALID_ARGUMENT, then the daemon hangs up
    assert recv_frame(sock, 1 << 20) is None
    sock.close()
    sock = raw_lane(path)
    send_frame(sock, 99, b"")
    status, message = recv_frame(sock, 1 << 20)
    assert status == 12 and b"99" in message              # UNIMPLEMENTED
    send_frame(sock, METHODS["Retrieve"][0], b"\xff\xff\xff not a protobuf")
    status, message = recv_frame(sock, 1 << 20)
    assert status == 3 and b"Retrieve" in message
    send_frame(sock, METHODS["Retrieve"][0], pb.RetrieveRequest(session_ids=["nope"], k=1).SerializeToString())
    status, message = recv_frame(sock, 1 << 20)
    assert status in (3, 5)                               # refused, and the connection still answers
    sock.close()
    with kvd_daemon.client() as client:                   # the daemon is unharmed
        fill(client, "after")
        assert client.retrieve("after", 0, torch.ones(HEADS, DIM), k=2).counts == [2]


def test_tokens_and_tenants_on_the_fast_lane(daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice alice-token-0123456789\nbob bob-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    daemon = daemon_factory(["--set", f"server.token_file={tokens}"], tcp=False)
    path = daemon.socket + ".fast"
    with pytest.raises(UnauthenticatedError, match="invalid bearer token"):
        FastLane(path, "not-a-valid-token-at-all", 10)
    alice = daemon.client(token="alice-token-0123456789")
    bob = daemon.client(token="bob-token-0123456789abcdef")
    fill(alice, "secret")
    bob.create_session("mine", num_layers=1, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM)
    bob.append("mine", 0, torch.ones(1, KV_HEADS, 4, DIM).half(), torch.ones(1, KV_HEADS, 4, DIM).half())
    assert alice.uses_fast_lane and bob.uses_fast_lane
    with pytest.raises(NotFoundError):
        bob.retrieve("secret", 0, torch.ones(HEADS, DIM), k=1)
    with pytest.raises(NotFoundError):
        bob.fetch("secret", 0, 4)
    assert alice.retrieve("secret", 0, torch.ones(HEADS, DIM), k=1).counts == [1]
    local = daemon.client()                               # no token on the Unix socket: the default tenant
    local.create_session("own", num_layers=1, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM)
    assert local.uses_fast_lane or local.append("own", 0, torch.ones(1, KV_HEADS, 2, DIM).half(),
                                                torch.ones(1, KV_HEADS, 2, DIM).half()) is not None
    assert local.uses_fast_lane
    with pytest.raises(NotFoundError):
        local.retrieve("secret", 0, torch.ones(HEADS, DIM), k=1)
    for client in (alice, bob, local):
        client.close()


def test_connection_limit_falls_back_to_grpc(daemon_factory):
    daemon = daemon_factory(["--set", "server.fast_lane_connections=1"], tcp=False)
    first, second = daemon.client(), daemon.client()
    fill(first, "a")
    assert first.uses_fast_lane
    keys = torch.randn(1, KV_HEADS, 5, DIM).half()
    second.create_session("b", num_layers=1, num_kv_heads=KV_HEADS, num_query_heads=HEADS, head_dim=DIM)
    second.append("b", 0, keys, keys)
    assert not second.uses_fast_lane, "the second connection is refused: gRPC carries its calls"
    assert torch.equal(second.fetch("b").keys, keys)
    first.close()
    second.close()


def test_metrics_count_fast_lane_calls(daemon_factory):
    port = free_port()
    daemon = daemon_factory(["--set", f"server.metrics=127.0.0.1:{port}"], tcp=False)
    client = daemon.client()
    fill(client, "m")
    for _ in range(3):
        client.retrieve("m", 0, torch.ones(HEADS, DIM), k=3)
    with pytest.raises(InvalidArgumentError):
        client.retrieve("m", 9, torch.ones(HEADS, DIM), k=3)
    assert client.uses_fast_lane
    client.close()
    body = scrape_metrics(port)
    assert 'kvd_rpc_requests_total{method="kvd.v1.Kvd/Retrieve"} 4' in body
    assert 'kvd_rpc_requests_total{method="kvd.v1.Kvd/Append"} 2' in body
    assert 'kvd_rpc_errors_total{method="kvd.v1.Kvd/Retrieve",code="INVALID_ARGUMENT"} 1' in body
    assert 'kvd_retrieve_duration_seconds_count{mode="attention",index_kind="flat"} 3' in body


def test_off_by_config_and_clean_shutdown_with_open_lanes(daemon_factory):
    off = daemon_factory(["--set", "server.fast_lane=false"], tcp=False, subdir="off")
    with off.client() as client:
        fill(client, "x")
        assert not client.uses_fast_lane
    assert not os.path.exists(off.socket + ".fast")
    on = daemon_factory(tcp=False, subdir="on")
    idle = on.client()
    fill(idle, "y")
    assert idle.uses_fast_lane                           # an idle open connection must not hold up shutdown
    assert on.stop(timeout=20) == 0
    assert not os.path.exists(on.socket + ".fast")
    with pytest.raises(Exception):  # noqa: B017 - the daemon is gone: any transport error, never a hang
        idle.retrieve("y", 0, torch.ones(HEADS, DIM), k=1)
    idle.close()


@pytest.mark.parametrize("fast_lane", [True, False])
def test_a_client_outlives_a_daemon_restart(kvd_daemon, fast_lane):
    """The restarted daemon has forgotten the client's shared-memory region (and its lane connection): the
    client registers the region again and carries on, reads and appends alike."""
    client = kvd_daemon.client(fast_lane=fast_lane)
    keys, _ = fill(client, "r")
    client.persist("r")
    kvd_daemon.restart()
    queries = torch.randn(HEADS, DIM, generator=torch.Generator().manual_seed(2))
    result = client.retrieve("r", 1, queries, k=10, mode="ids")
    assert [set(row.tolist()) for row in result.ids] == brute_topk(queries, keys[1], 10)
    more = torch.ones(2, KV_HEADS, 3, DIM).half()
    client.append("r", TOKENS, more, more)
    assert torch.equal(client.fetch("r", TOKENS).keys, more)
    assert client.uses_fast_lane == fast_lane
    client.close()
