"""Bearer tokens, tenants and name validation, against a real grpc.aio server on a Unix socket and TCP."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kvd import auth, metrics
from kvd.auth import AuthInterceptor, TokenFileError, TokenStore

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210xyz"


def write_tokens(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --- token file -------------------------------------------------------------------------------------

def test_load_token_file(tmp_path: Path) -> None:
    digest = hashlib.sha256(BOB.encode()).hexdigest()
    path = write_tokens(tmp_path / "tokens", f"# comment\n\nalice {ALICE}   # trailing comment\n"
                                             f"bob sha256:{digest}\nalice another-alice-token-000000\n")
    store = TokenStore.load(path)
    assert store.tenants == {"alice", "bob"}
    assert store.authenticate(ALICE) == "alice"
    assert store.authenticate("another-alice-token-000000") == "alice"
    assert store.authenticate(BOB) == "bob"
    assert store.authenticate("nope") is None
    assert store.authenticate(ALICE[:-1]) is None
    assert ALICE not in repr(store)  # only digests are kept


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_refuses_accessible_token_file(tmp_path: Path, mode: int) -> None:
    path = write_tokens(tmp_path / "tokens", f"alice {ALICE}\n", mode)
    with pytest.raises(TokenFileError, match=rf"mode {mode:04o}.*chmod 600"):
        TokenStore.load(path)


def test_systemd_credential_is_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    path = write_tokens(creds / "tokens", f"alice {ALICE}\n", 0o440)  # as an ACL'd credential looks
    with pytest.raises(TokenFileError, match="mode 0440"):
        TokenStore.load(path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert TokenStore.load(path).tenants == {"alice"}
    outside = write_tokens(tmp_path / "tokens", f"alice {ALICE}\n", 0o644)
    with pytest.raises(TokenFileError, match="mode 0644"):  # only files of that very directory
        TokenStore.load(outside)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_refuses_token_file_of_another_user(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens", f"alice {ALICE}\n")
    os.chown(path, 4242, -1)
    with pytest.raises(TokenFileError, match="owned by uid 4242"):
        TokenStore.load(path)


@pytest.mark.parametrize(("text", "message"), [
    ("", "lists no tokens"),
    ("# only a comment\n", "lists no tokens"),
    (f"alice {ALICE} extra\n", r":1: expected '<tenant> <token>', found 3"),
    (f"alice\nbob {BOB}\n", r":1: expected"),
    ("alice short\n", r":1: token of tenant 'alice' is shorter than 16"),
    (f"alice {ALICE}\nbob {ALICE}\n", r":2: the same token is listed twice"),
    (f".hidden {ALICE}\n", r":1: tenant name '.hidden'"),
    (f"a/b {ALICE}\n", r":1: tenant name 'a/b'"),
    ("alice tökén-with-non-ascii-chars\n", r":1: tokens are visible ASCII"),
])
def test_malformed_token_files(tmp_path: Path, text: str, message: str) -> None:
    path = write_tokens(tmp_path / "tokens", text)
    with pytest.raises(TokenFileError, match=message):
        TokenStore.load(path)


def test_missing_and_non_regular_token_files(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot open"):
        TokenStore.load(tmp_path / "absent")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(TokenFileError, match="not a regular file"):
        TokenStore.load(tmp_path / "dir")
    os.mkfifo(tmp_path / "fifo", 0o600)  # must not block waiting for a writer
    with pytest.raises(TokenFileError, match="not a regular file"):
        TokenStore.load(tmp_path / "fifo")


# --- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "kvd_region-1.bin", "A" * 200, "x..y", "-dash"])
def test_region_key_ok(name: str) -> None:
    assert auth.validate_region_key(name) == name


@pytest.mark.parametrize(("name", "message"), [
    ("", "empty"), ("A" * 201, "201 characters"), (".hidden", "must not start with '.'"),
    ("..", "must not start with '.'"), ("../etc/passwd", "contains '/'"), ("/dev/shm/x", "contains '/'"),
    ("a b", "contains ' '"), ("naïve", "contains 'ï'"), ("nul\0byte", "contains"), (None, "must be a string"),
    (b"bytes", "must be a string"),
])
def test_region_key_refused(name: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auth.validate_region_key(name)


def test_get_tenant_outside_rpc() -> None:
    with pytest.raises(RuntimeError, match="no authenticated tenant"):
        auth.get_tenant()


# --- a real server ----------------------------------------------------------------------------------

async def _tenant_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    in_thread = await asyncio.to_thread(auth.get_tenant)  # to_thread copies the context
    assert in_thread == auth.get_tenant()
    return auth.get_tenant().encode()


async def _tenant_stream_gen(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield auth.get_tenant().encode()
        await asyncio.sleep(0)


async def _tenant_stream_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(auth.get_tenant().encode())


async def _tenant_client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    count = 0
    async for _ in requests:
        count += 1
    return f"{auth.get_tenant()}:{count}".encode()


async def _tenant_bidi(requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield auth.get_tenant().encode() + b":" + request


async def _health(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"SERVING"


_HANDLERS = (
    grpc.method_handlers_generic_handler("t.Tenant", {
        "Unary": grpc.unary_unary_rpc_method_handler(_tenant_unary),
        "StreamGen": grpc.unary_stream_rpc_method_handler(_tenant_stream_gen),
        "StreamWrite": grpc.unary_stream_rpc_method_handler(_tenant_stream_write),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_tenant_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_tenant_bidi),
    }),
    grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(_health),
    }),
)


class Daemon:
    """One grpc.aio server listening on a Unix socket and on 127.0.0.1:0, like kvd with TCP on."""

    def __init__(self, tmp_path: Path, *interceptors: grpc.aio.ServerInterceptor) -> None:
        self.server = grpc.aio.server(interceptors=interceptors)
        self.server.add_generic_rpc_handlers(_HANDLERS)
        self.unix = f"unix:{tmp_path}/kvd.sock"
        self.server.add_insecure_port(self.unix)
        self.tcp = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def __aenter__(self) -> Daemon:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


def _metadata(token: str | None, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"{scheme} {token}"),)


async def call(target: str, token: str | None, method: str = "Unary", scheme: str = "Bearer") -> str:
    """The tenant the server saw, or the name of the status code it answered."""
    md = _metadata(token, scheme)
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            if method == "Unary":
                return (await channel.unary_unary("/t.Tenant/Unary")(b"", metadata=md)).decode()
            if method in ("StreamGen", "StreamWrite"):
                replies = [r async for r in channel.unary_stream(f"/t.Tenant/{method}")(b"", metadata=md)]
                assert len(set(replies)) == 1
                return replies[0].decode()
            if method == "ClientStream":
                async def requests() -> AsyncIterator[bytes]:
                    # Let a refusal arrive before the first write: a refused client stream whose writes
                    # race the server's abort can surface as INTERNAL on the client (a grpc race, seen in CI).
                    await asyncio.sleep(0.05)
                    for _ in range(3):
                        yield b"x"
                reply = await channel.stream_unary("/t.Tenant/ClientStream")(requests(), metadata=md)
                tenant, count = reply.decode().split(":")
                assert count == "3"
                return tenant
            if method == "Bidi":
                bidi = channel.stream_stream("/t.Tenant/Bidi")(metadata=md)
                await bidi.write(b"ping")
                reply = await bidi.read()
                await bidi.done_writing()
                assert reply.endswith(b":ping")
                return reply.decode().split(":")[0]
            if method == "Health":
                return (await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", metadata=md)).decode()
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    raise AssertionError(method)


@pytest.fixture
def tokens() -> TokenStore:
    return TokenStore.from_pairs([("alice", ALICE), ("bob", BOB)])


def test_tcp_requires_a_valid_bearer_token(tmp_path: Path, tokens: TokenStore) -> None:
    async def scenario() -> None:
        async with Daemon(tmp_path, AuthInterceptor(tokens)) as d:
            assert await call(d.tcp, None) == "UNAUTHENTICATED"
            assert await call(d.tcp, "wrong-token-wrong-token") == "UNAUTHENTICATED"
            assert await call(d.tcp, ALICE, scheme="Basic") == "UNAUTHENTICATED"
            assert await call(d.tcp, "") == "UNAUTHENTICATED"
            assert await call(d.tcp, ALICE) == "alice"
            assert await call(d.tcp, BOB, scheme="bearer") == "bob"
            for method in ("StreamGen", "StreamWrite", "ClientStream", "Bidi"):
                assert await call(d.tcp, ALICE, method) == "alice", method
                assert await call(d.tcp, BOB, method) == "bob", method
                assert await call(d.tcp, None, method) == "UNAUTHENTICATED", method
                assert await call(d.tcp, "wrong-token-wrong-token", method) == "UNAUTHENTICATED", method
            assert await call(d.tcp, None, "Health") == "SERVING"  # probes need no token
            # the rejection message says what to do
            async with grpc.aio.insecure_channel(d.tcp) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary("/t.Tenant/Unary")(b"")
                assert "authorization: Bearer" in (info.value.details() or "")

    asyncio.run(scenario())


def test_unix_socket_tenants(tmp_path: Path, tokens: TokenStore) -> None:
    async def scenario() -> None:
        async with Daemon(tmp_path, AuthInterceptor(tokens)) as d:
            assert await call(d.unix, None) == "default"
            assert await call(d.unix, None, "Bidi") == "default"
            assert await call(d.unix, BOB) == "bob"
            assert await call(d.unix, "wrong-token-wrong-token") == "UNAUTHENTICATED"
        async with Daemon(tmp_path, AuthInterceptor(tokens, require_token_local=True,
                                                     local_tenant="local")) as d:
            assert await call(d.unix, None) == "UNAUTHENTICATED"
            assert await call(d.unix, ALICE) == "alice"

    asyncio.run(scenario())


def test_without_token_file(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Daemon(tmp_path, AuthInterceptor(None)) as d:
            assert await call(d.unix, None) == "default"
            assert await call(d.unix, ALICE) == "UNAUTHENTICATED"  # a token is refused, not ignored
            assert await call(d.tcp, None) == "UNAUTHENTICATED"  # no TCP without tokens...
        async with Daemon(tmp_path, AuthInterceptor(None, allow_insecure_tcp=True)) as d:
            assert await call(d.tcp, None) == "default"  # ...unless explicitly allowed

    asyncio.run(scenario())


def test_token_file_end_to_end_and_reload(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens", f"alice {ALICE}\n")
    interceptor = AuthInterceptor(TokenStore.load(path))

    async def scenario() -> None:
        async with Daemon(tmp_path, interceptor) as d:
            assert await call(d.tcp, ALICE) == "alice"
            assert await call(d.tcp, BOB) == "UNAUTHENTICATED"
            write_tokens(path, f"bob {BOB}\n")
            interceptor.update_tokens(TokenStore.load(path))
            assert await call(d.tcp, BOB) == "bob"
            assert await call(d.tcp, ALICE) == "UNAUTHENTICATED"

    asyncio.run(scenario())


def test_refusals_are_counted_by_the_metrics_interceptor(tmp_path: Path, tokens: TokenStore) -> None:
    errors = metrics.RPC_ERRORS.labels("t.Tenant/Unary", "UNAUTHENTICATED")
    before = errors.get()

    async def scenario() -> None:
        async with Daemon(tmp_path, metrics.RpcMetricsInterceptor(), AuthInterceptor(tokens)) as d:
            assert await call(d.tcp, None) == "UNAUTHENTICATED"
            assert await call(d.tcp, ALICE) == "alice"

    asyncio.run(scenario())
    assert errors.get() == before + 1


def test_resolve_rules(tokens: TokenStore) -> None:
    interceptor = AuthInterceptor(tokens)
    assert interceptor.resolve([("authorization", f"Bearer {ALICE}")], "ipv6:[::1]:5000") == "alice"
    assert interceptor.resolve([("authorization", f"  Bearer   {ALICE}  ")], "ipv4:1.2.3.4:5") == "alice"
    assert interceptor.resolve(None, "unix-abstract:kvd") == "default"
    with pytest.raises(auth.Unauthenticated, match="more than one"):
        interceptor.resolve([("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {BOB}")],
                            "unix:")
    with pytest.raises(ValueError, match="tenant name"):
        AuthInterceptor(tokens, local_tenant="../x")
