"""The fast lane: kvd's data-path calls over a plain Unix socket, beside gRPC.

A decode step makes one Retrieve per layer, in sequence, so per-call overhead multiplies by the layer count.
gRPC's own round trip on a Unix socket is ~0.5 ms, and the daemon's asyncio server adds an executor hop;
this lane sends the same protobuf messages, framed by a 5-byte header, to a thread of the daemon that runs
the call directly. Tensors still travel through the client's shared-memory region, so the lane is offered
only to local clients: the daemon names its socket in RegisterSharedMemoryResponse.fast_lane_socket.

Frames: header struct "<BI" (kind, payload length), then the payload.
- client -> daemon: kind = method id (HELLO first, with the bearer token as UTF-8, possibly empty), payload =
  the serialized request;
- daemon -> client: kind = gRPC status code value (0 = OK), payload = the serialized reply, or the error
  message as UTF-8.

Prepared Retrieves (kvd_client.prepared), the decode loop's call without protobuf on either side:
- PREPARE: payload = a RetrieveRequest template (see PrepareRetrieveResponse in kvd.proto), reply = a
  PrepareRetrieveResponse;
- RUN: payload = RUN_HEADER (plan id, layer, number of ranges: 0 = each session's offloaded part, else one per
  sequence) then that many RANGE (begin, end; end 0 = the session's length); reply = RUN_REPLY (server, search,
  attend, search-kernel and attend-kernel ms) then one RUN_SEQUENCE (count, IndexKind wire value, promoted) per
  sequence; the ids, output and lse are in the plan's shared-memory slots;
- RUN_SIGNALLED: payload = SIGNAL (offset, value) then a RUN payload; the same run, after which (also when it
  fails) the daemon stores the uint32 `value` at byte `offset` of the plan's shared-memory region (4-aligned,
  outside the plan's tensors) before it replies. A GPU stream can wait on that word (cuStreamWaitValue32), so the
  client may launch work that consumes the results before it has read the reply (kvd_transformers.launch_ahead);
- RELEASE: payload = RELEASE_BODY (plan id), empty reply.
Plans belong to their connection: they end with it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import grpc

from kvd.v1 import kvd_pb2 as pb
from kvd_client.errors import KvdError, UnavailableError, from_status

HEADER = struct.Struct("<BI")
HELLO = 0
# method name -> (id, request type, reply type); only unary calls whose tensors travel in shared memory
READ_ONLY = frozenset({"Retrieve", "Fetch"})
METHODS: dict[str, tuple[int, type, type]] = {
    "Retrieve": (1, pb.RetrieveRequest, pb.RetrieveResponse),
    "Append": (2, pb.AppendRequest, pb.AppendResponse),
    "Fetch": (3, pb.FetchRequest, pb.FetchResponse),
}
METHOD_BY_ID = {ident: (name, request, reply) for name, (ident, request, reply) in METHODS.items()}
PREPARE, RUN, RELEASE, RUN_SIGNALLED = 4, 5, 6, 7
RUN_HEADER = struct.Struct("<III")
RANGE = struct.Struct("<qq")
RUN_REPLY = struct.Struct("<5d")
RUN_SEQUENCE = struct.Struct("<IBB")
RELEASE_BODY = struct.Struct("<I")
SIGNAL = struct.Struct("<QI")
STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def recv_exact(sock: socket.socket, size: int) -> bytearray | None:
    """Exactly `size` bytes, or None when the peer closed the connection before the first byte."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed mid-frame ({got} of {size} bytes)")
        got += n
    return buffer


def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(kind, len(payload)) + payload)


def recv_frame(sock: socket.socket, max_bytes: int) -> tuple[int, bytearray] | None:
    """(kind, payload), or None at a clean end of the connection."""
    header = recv_exact(sock, HEADER.size)
    if header is None:
        return None
    kind, size = HEADER.unpack(header)
    if size > max_bytes:
        raise ConnectionError(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    payload = recv_exact(sock, size) if size else bytearray()
    if payload is None:
        raise ConnectionError("connection closed after a frame header")
    return kind, payload


class FastLane:
    """One connection to the daemon's fast-lane socket. Not thread-safe: the client calls it under its lock."""

    def __init__(self, path: str, token: str | None, timeout: float | None, max_bytes: int = 1 << 30) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.broken = False  # set when the connection failed; the caller then drops this lane
        self._pending: tuple[str, Callable[[bytearray | KvdError], None]] | None = None  # send_only()'s reply
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout if timeout is not None else 10.0)
            self.sock.connect(path)
            send_frame(self.sock, HELLO, (token or "").encode())
            self._reply()  # the daemon's answer to the hello: OK or an error
            self.sock.settimeout(timeout)
        except BaseException:
            self.sock.close()
            raise

    def call(self, method: str, request: Any) -> Any:
        """Send one request and wait for its reply; raises the same KvdError subclasses as the gRPC path.
        A broken or timed-out connection raises UnavailableError / KvdError(DEADLINE_EXCEEDED) and sets
        `broken`: the lane must not be used again."""
        ident, _, reply_type = METHODS[method]
        return reply_type.FromString(bytes(self.call_raw(ident, request.SerializeToString(), method)))

    def call_raw(self, kind: int, payload: bytes, what: str) -> bytearray:
        """call() with a payload and reply that are bytes (the prepared Retrieve's binary frames)."""
        self.collect()
        return self._exchange(kind, payload, what, True)

    def send_only(self, kind: int, payload: bytes, what: str,
                  on_reply: Callable[[bytearray | KvdError], None]) -> None:
        """Send a request whose reply is read later: by collect(), or before this lane's next call, whichever
        comes first; `on_reply` then gets the reply's payload or its error. Raises as call_raw() when the send
        fails (on_reply is then never called)."""
        self.collect()
        self._exchange(kind, payload, what, False)
        self._pending = (what, on_reply)

    def collect(self) -> None:
        """Read the reply of the request that send_only() sent, if it has not been read yet."""
        if self._pending is None:
            return
        what, on_reply = self._pending
        self._pending = None
        try:
            reply: bytearray | KvdError = self._exchange(None, b"", what, True)
        except KvdError as exc:
            reply = exc
        on_reply(reply)

    def _exchange(self, kind: int | None, payload: bytes, what: str, wait: bool) -> bytearray:
        """Send a frame (kind None: none) and, with `wait`, read the reply; connection failures mark the lane broken."""
        try:
            if kind is not None:
                send_frame(self.sock, kind, payload)
            return self._reply() if wait else bytearray()
        except TimeoutError:
            self.broken = True
            raise KvdError(grpc.StatusCode.DEADLINE_EXCEEDED, f"fast-lane {what} timed out") from None
        except OSError as exc:
            self.broken = True
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, f"fast-lane connection lost: {exc}") from None

    def _reply(self) -> bytearray:
        frame = recv_frame(self.sock, self.max_bytes)
        if frame is None:
            raise ConnectionError("the daemon closed the fast-lane connection")
        status, payload = frame
        if status != 0:
            code = STATUS_BY_VALUE.get(status, grpc.StatusCode.UNKNOWN)
            raise from_status(code, payload.decode(errors="replace"))
        return payload

    def close(self) -> None:
        self.sock.close()
        if self._pending is not None:  # a reply nobody will read now
            what, on_reply = self._pending
            self._pending = None
            on_reply(UnavailableError(grpc.StatusCode.UNAVAILABLE, f"fast-lane {what}: the connection was closed"))
