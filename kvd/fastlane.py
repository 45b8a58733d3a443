"""The daemon's fast lane: Retrieve, Append and Fetch over a plain Unix socket (protocol: kvd_client.fastlane).

One thread per connection reads a request, runs it through KvdServicer.invoke (the same handler bodies,
validation, error accounting and telemetry as the gRPC path) and writes the reply: no HTTP/2 framing, no
event-loop round trip, no executor hop. Every request is authenticated like a gRPC call from a Unix-socket
peer (the bearer token of the connection's hello, resolved per request so that a reloaded token file takes
effect at once). At most `max_connections` connections; further ones are answered UNAVAILABLE and closed
(the client then stays on gRPC). Each connection also keeps its prepared Retrieves (kvd.prepared).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import Any

import grpc
from kvd_client.fastlane import HELLO, METHOD_BY_ID, PREPARE, RELEASE, RUN, RUN_SIGNALLED, recv_frame, send_frame

from kvd import auth, metrics
from kvd.errors import KvdError
from kvd.prepared import ConnectionPlans
from kvd.service import KvdServicer
from kvd.v1 import kvd_pb2 as pb

log = logging.getLogger("kvd.fastlane")
_PEER = "unix:fast-lane"
_RUNS = frozenset({RUN, RUN_SIGNALLED})
_PLAN_METHODS = {PREPARE: "PrepareRetrieve", RUN: "RetrievePrepared", RUN_SIGNALLED: "RetrievePrepared",
                 RELEASE: "ReleasePrepared"}
_ACCEPT_POLL_SECONDS = 0.2


class FastLaneServer:
    def __init__(self, path: str, servicer: KvdServicer, authenticator: auth.AuthInterceptor, *,
                 socket_mode: int = 0o660, max_connections: int = 64, max_bytes: int = 1 << 30) -> None:
        self.path = path
        self.servicer = servicer
        self.auth = authenticator
        self.socket_mode = socket_mode
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.listener: socket.socket | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connections: dict[socket.socket, threading.Thread] = {}
        self.acceptor: threading.Thread | None = None
        self.request_counters: dict[str, Any] = {}  # the per-method series, looked up once (one per call adds up)

    def start(self) -> None:
        """Listen on `path` (the caller has made sure no other daemon uses it)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        os.chmod(self.path, self.socket_mode)
        listener.listen(self.max_connections)
        listener.settimeout(_ACCEPT_POLL_SECONDS)  # accept() polls so that stop() needs no wake-up trick
        self.listener = listener
        self.acceptor = threading.Thread(target=self._accept_loop, name="kvd-fast-accept", daemon=True)
        self.acceptor.start()

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                raise
            conn.settimeout(None)
            with self.lock:
                if len(self.connections) >= self.max_connections:
                    self._refuse(conn, f"the daemon has its {self.max_connections} fast-lane connections in use")
                    continue
                thread = threading.Thread(target=self._serve, args=(conn,), name="kvd-fast", daemon=True)
                self.connections[conn] = thread
            thread.start()

    @staticmethod
    def _refuse(conn: socket.socket, message: str) -> None:
        with contextlib.suppress(OSError):
            send_frame(conn, grpc.StatusCode.UNAVAILABLE.value[0], message.encode())
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._conversation(conn)
        except (ConnectionError, OSError) as exc:
            if not self.stopping.is_set():
                log.debug("fast-lane connection ended: %s", exc)
        except Exception:
            log.exception("fast-lane connection failed")
        finally:
            with self.lock:
                self.connections.pop(conn, None)
            conn.close()

    def _conversation(self, conn: socket.socket) -> None:
        hello = recv_frame(conn, self.max_bytes)
        if hello is None:
            return
        kind, payload = hello
        if kind != HELLO:
            send_frame(conn, grpc.StatusCode.INVALID_ARGUMENT.value[0], b"the first fast-lane frame must be HELLO")
            return
        token = payload.decode(errors="replace")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            self.auth.resolve(metadata, _PEER)
        except auth.Unauthenticated as exc:
            log.warning("unauthenticated fast-lane connection: %s", exc)
            send_frame(conn, grpc.StatusCode.UNAUTHENTICATED.value[0], str(exc).encode())
            return
        send_frame(conn, 0, b"")
        plans = ConnectionPlans(self.servicer.engine)
        # the plan calls' bodies in KvdServicer.invoke's form, made once per connection (RUN is on the decode path)
        bodies = {PREPARE: lambda _servicer, *args: plans.prepare(*args),
                  RUN: lambda _servicer, *args: plans.run(*args),
                  RUN_SIGNALLED: lambda _servicer, *args: plans.run_signalled(*args),
                  RELEASE: lambda _servicer, *args: plans.release(*args)}
        while not self.stopping.is_set():
            frame = recv_frame(conn, self.max_bytes)
            if frame is None:
                return
            status, reply = self._call(metadata, bodies, *frame)
            send_frame(conn, status, reply)

    def _call(self, metadata: Any, bodies: dict[int, Any], kind: int, payload: bytearray) -> tuple[int, bytes]:
        if kind in _PLAN_METHODS:
            method = _PLAN_METHODS[kind]
        elif kind in METHOD_BY_ID:
            method = METHOD_BY_ID[kind][0]
        else:
            return grpc.StatusCode.UNIMPLEMENTED.value[0], f"unknown fast-lane method id {kind}".encode()
        full_name = f"kvd.v1.Kvd/{method}"
        if (requests := self.request_counters.get(full_name)) is None:
            requests = self.request_counters[full_name] = metrics.RPC_REQUESTS.labels(full_name)
        requests.inc()
        code = grpc.StatusCode.OK
        try:
            tenant = self.auth.resolve(metadata, _PEER)
            if kind in _PLAN_METHODS:  # RUN is the decode loop's call: bytes in, bytes out
                request = pb.RetrieveRequest.FromString(bytes(payload)) if kind == PREPARE else bytes(payload)
                reply = self.servicer.invoke(bodies[kind], request, tenant,
                                             name="Retrieve" if kind in _RUNS else method)  # a run's telemetry
                return 0, reply.SerializeToString() if kind == PREPARE else reply
            request = METHOD_BY_ID[kind][1].FromString(bytes(payload))
            return 0, self.servicer.invoke_named(method, request, tenant).SerializeToString()
        except auth.Unauthenticated as exc:
            code, message = grpc.StatusCode.UNAUTHENTICATED, str(exc)
        except KvdError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # an unparsable request
            code, message = grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse the {method} request: {exc}"
        metrics.RPC_ERRORS.labels(full_name, code.name).inc()
        return code.value[0], message.encode()

    def stop(self, grace: float) -> None:
        """Stop accepting; let every call in progress finish and answer (up to `grace` s); close the socket."""
        self.stopping.set()
        if self.acceptor is not None:
            self.acceptor.join()
        if self.listener is not None:
            self.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with self.lock:
            open_connections = list(self.connections.items())
        for conn, _ in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)  # ends a wait for the next request; a reply being written still goes
        for _, thread in open_connections:
            thread.join(grace)
