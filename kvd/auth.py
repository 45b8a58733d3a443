"""Bearer-token authentication, tenant mapping and name validation for the grpc.aio server.

Token file (server.token_file) — one `<tenant> <token>` pair per line:

    # kvd tokens. '#' starts a comment; blank lines are ignored.
    chat-app   hXq3v5b0...                 # a plaintext token (>= 16 visible ASCII characters)
    batch-jobs sha256:9f86d081884c7d65...   # or the hex sha256 of the token, so the file holds no secret
    chat-app   Zr8p1k...                   # a tenant may have several tokens (rotation)

Tokens cannot contain '#' or whitespace (secrets.token_urlsafe(32) makes good ones). Tenant names follow
validate_tenant(): 1..64 characters of [A-Za-z0-9_.-], not starting with '.'.

The file must be a regular file owned by the daemon's user and not readable or writable by group or
others (chmod 600), or loading fails with TokenFileError. The one exception is a file in the unit's
$CREDENTIALS_DIRECTORY (systemd `LoadCredential=tokens:/etc/kvd/tokens`, token_file =
"/run/credentials/kvd.service/tokens"): systemd itself restricts those to the unit's user, and depending
on its version does so with an ACL on a root-owned file, which the owner/mode check would misread.

Only sha256 digests are kept in memory, and every presented token is compared against all of them with
hmac.compare_digest.

Who is which tenant (AuthInterceptor):
- TCP peer: `authorization: Bearer <token>` metadata is required and must match a token of the file;
  otherwise the call ends with UNAUTHENTICATED. With no token file, TCP calls are refused unless the
  daemon runs with allow_insecure_tcp, in which case they get the local tenant.
- Unix-socket peer: the socket's file mode and group decide who may connect. A call without a token
  gets the local tenant ("default"); a call with a token is authenticated like TCP (so several tenants
  can share the socket); require_token_local=True makes the token mandatory there too.
- A token sent to a daemon with no token file is refused rather than ignored.
- Per-uid tenants are not offered: grpc Python does not expose the connection's SO_PEERCRED. On a Unix
  socket context.peer() is just "unix:" (the client end is unbound) and auth_context() only says the
  transport is insecure, so there is nothing to derive a uid from.

Handlers read the tenant with `get_tenant()` (or the `current_tenant` ContextVar). The interceptor sets it
inside the wrapped handler, in the RPC's own task, so it is visible to the handler and to whatever the
handler awaits, and to `asyncio.to_thread` work (which copies the context) — but not to work handed to a
bare `loop.run_in_executor`, which does not copy contextvars: read the tenant first and pass it along.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import inspect
import logging
import os
import re
import stat
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from kvd_client.shm import validate_key as validate_region_key  # shared-memory names: one rule

__all__ = [
    "DEFAULT_TENANT",
    "HEALTH_METHODS",
    "AuthInterceptor",
    "TokenFileError",
    "TokenStore",
    "Unauthenticated",
    "current_tenant",
    "get_tenant",
    "is_local_peer",
    "validate_region_key",
    "validate_tenant",
    "wrap_rpc_handler",
]

_log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
MIN_TOKEN_LENGTH = 16

current_tenant: ContextVar[str] = ContextVar("kvd_tenant")

_TENANT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_DIGEST_RE = re.compile(r"sha256:([0-9a-fA-F]{64})")


class TokenFileError(ValueError):
    """The token file is missing, unsafe (permissions, owner) or malformed."""


class Unauthenticated(Exception):
    """The caller did not prove who it is; the message is safe to send back."""


# --- names ------------------------------------------------------------------------------------------

def validate_tenant(name: str) -> str:
    """Tenant names: 1..64 characters of [A-Za-z0-9_.-], not starting with '.'."""
    if not _TENANT_RE.fullmatch(name):
        raise ValueError(f"tenant name {name[:80]!r} must be 1..64 characters of letters, digits, '_', '.', "
                         "'-' and not start with '.'")
    return name


# --- tokens -----------------------------------------------------------------------------------------

def _is_systemd_credential(path: str) -> bool:
    """True if `path` is a file of this unit's $CREDENTIALS_DIRECTORY (systemd LoadCredential=)."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory or not os.path.isabs(directory):
        return False
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(directory)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenStore:
    """sha256 digests of bearer tokens and the tenant each one maps to."""

    entries: tuple[tuple[bytes, str], ...]
    source: str = "<memory>"

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]], source: str = "<memory>") -> TokenStore:
        """Build from (tenant, token) pairs; a token may be written 'sha256:<hex digest>'."""
        items = ((f"{source}: entry {n}", tenant, token) for n, (tenant, token) in enumerate(pairs, 1))
        return cls._build(items, source)

    @classmethod
    def _build(cls, items: Iterable[tuple[str, str, str]], source: str) -> TokenStore:
        entries: list[tuple[bytes, str]] = []
        seen: dict[bytes, str] = {}
        for where, tenant, token in items:
            try:
                validate_tenant(tenant)
            except ValueError as exc:
                raise TokenFileError(f"{where}: {exc}") from None
            match = _DIGEST_RE.fullmatch(token)
            if match:
                digest = bytes.fromhex(match.group(1))
            elif not _TOKEN_RE.fullmatch(token):
                raise TokenFileError(f"{where}: tokens are visible ASCII characters without spaces")
            elif len(token) < MIN_TOKEN_LENGTH:
                raise TokenFileError(
                    f"{where}: token of tenant {tenant!r} is shorter than {MIN_TOKEN_LENGTH} characters "
                    "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
            else:
                digest = _digest(token)
            if digest in seen:
                raise TokenFileError(f"{where}: the same token is listed twice (tenants {seen[digest]!r} and "
                                     f"{tenant!r}); every token must map to exactly one tenant")
            seen[digest] = tenant
            entries.append((digest, tenant))
        if not entries:
            raise TokenFileError(f"{source} lists no tokens")
        return cls(tuple(entries), source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        """Read a token file, refusing one that others could read or that another user owns."""
        path = os.fspath(path)
        try:  # O_NONBLOCK: a FIFO planted at the path must not hang the daemon
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise TokenFileError(f"cannot open token file {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)  # the file actually opened, not whatever the path names now
            if not stat.S_ISREG(info.st_mode):
                raise TokenFileError(f"token file {path} is not a regular file")
            if _is_systemd_credential(path):
                pass  # systemd made it readable by this unit's user only (owner/ACL vary by version)
            elif info.st_mode & 0o077:
                raise TokenFileError(
                    f"token file {path} has mode {stat.S_IMODE(info.st_mode):04o}: it must not be accessible "
                    f"to group or others; run: chmod 600 {path}")
            elif info.st_uid != os.geteuid():
                raise TokenFileError(
                    f"token file {path} is owned by uid {info.st_uid}, but kvd runs as uid {os.geteuid()}; "
                    "the file must belong to the daemon's user (chown it, or pass it with LoadCredential=)")
            with os.fdopen(os.dup(fd), "rb") as handle:
                raw = handle.read(1 << 20)
        finally:
            os.close(fd)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise TokenFileError(f"token file {path} is not UTF-8 text") from None
        items: list[tuple[str, str, str]] = []
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise TokenFileError(
                    f"{path}:{number}: expected '<tenant> <token>', found {len(fields)} field(s)")
            items.append((f"{path}:{number}", fields[0], fields[1]))
        return cls._build(items, f"token file {path}")

    def authenticate(self, token: str) -> str | None:
        """The tenant of `token`, or None. Compares with every stored digest in constant time."""
        presented = _digest(token)
        found: str | None = None
        for digest, tenant in self.entries:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(tenant for _, tenant in self.entries)


# --- resolving a call's tenant ----------------------------------------------------------------------

def is_local_peer(peer: str) -> bool:
    """True for a Unix-socket peer as grpc reports it ("unix:..." or "unix-abstract:...")."""
    return peer.startswith(("unix:", "unix-abstract:"))


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry; None if there is none."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("more than one authorization metadata entry")
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    return token


# --- wrapping handlers ------------------------------------------------------------------------------

Hook = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[Any]]


def wrap_rpc_handler(handler: grpc.RpcMethodHandler, hook: Hook) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behavior runs inside `async with hook(context):`, in the RPC's own task.

    Works for the four arities and for both streaming-response styles of grpc.aio (async generator, or
    coroutine that calls context.write). Raises TypeError for synchronous behaviors (not used by kvd)."""
    if handler.request_streaming and handler.response_streaming:
        inner, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        inner, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        inner, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        inner, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    behavior: Callable[..., Any] = inner
    if inspect.isasyncgenfunction(behavior):
        async def wrapped_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with hook(context):
                async for response in behavior(request, context):
                    yield response
        wrapped: Callable[..., Any] = wrapped_gen
    elif inspect.iscoroutinefunction(behavior):
        async def wrapped_coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with hook(context):
                return await behavior(request, context)
        wrapped = wrapped_coro
    else:
        raise TypeError(f"cannot wrap synchronous gRPC behavior {behavior!r}; kvd handlers are async")
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call (see the module docstring) and sets `current_tenant` for its handler.

    Methods in `exempt_methods` (by default the standard health check) are passed through untouched and
    have no tenant."""

    def __init__(self, tokens: TokenStore | None, *, local_tenant: str = DEFAULT_TENANT,
                 allow_insecure_tcp: bool = False, require_token_local: bool = False,
                 exempt_methods: Iterable[str] = HEALTH_METHODS) -> None:
        self.tokens = tokens
        self.local_tenant = validate_tenant(local_tenant)
        self.allow_insecure_tcp = allow_insecure_tcp
        self.require_token_local = require_token_local
        self.exempt_methods = frozenset(exempt_methods)

    def update_tokens(self, tokens: TokenStore | None) -> None:
        """Swap in a reloaded token file (e.g. on SIGHUP); calls already running keep their tenant."""
        self.tokens = tokens

    def resolve(self, metadata: Sequence[tuple[str, Any]] | None, peer: str) -> str:
        """The tenant of a call with this metadata from this peer; raises Unauthenticated."""
        token = bearer_token(metadata)
        tokens = self.tokens
        if token is not None:
            if tokens is None:
                raise Unauthenticated("a bearer token was sent, but this kvd has no token file configured "
                                      "(server.token_file)")
            tenant = tokens.authenticate(token)
            if tenant is None:
                raise Unauthenticated("invalid bearer token")
            return tenant
        if is_local_peer(peer):
            if not self.require_token_local:
                return self.local_tenant
        elif tokens is None and self.allow_insecure_tcp:
            return self.local_tenant
        elif tokens is None:
            raise Unauthenticated("TCP access needs a token file (server.token_file) on the daemon")
        raise Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")

    @contextlib.asynccontextmanager
    async def _authenticate(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        peer = context.peer()
        try:
            tenant = self.resolve(context.invocation_metadata(), peer)
        except Unauthenticated as exc:
            _log.warning("unauthenticated call from %s: %s", peer, exc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        current_tenant.set(tenant)  # the RPC's task has its own context; no reset needed
        yield

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt_methods:
            return handler
        return wrap_rpc_handler(handler, self._authenticate)


def get_tenant() -> str:
    """The authenticated tenant of the current RPC."""
    try:
        return current_tenant.get()
    except LookupError:
        raise RuntimeError("no authenticated tenant in this context (is AuthInterceptor installed, and is "
                           "this code running inside an RPC handler?)") from None
