"""Prometheus metrics without the prometheus_client dependency.

Counter, Gauge and Histogram with labels, safe to update from any thread; a Registry that renders the
text exposition format 0.0.4; and `serve_metrics(host, port)`, a minimal asyncio HTTP endpoint answering
GET /metrics. The kvd metric families are module-level objects (see the end of this file) that the
daemon updates where things happen; gauges that mirror store state are best refreshed just before a
scrape with `REGISTRY.on_collect(callback)`.

    metrics.RETRIEVE_SECONDS.labels(mode="attention", index_kind="flat").observe(0.0012)
    metrics.TIER_BYTES.labels(tier="memory").set(store.memory_bytes)
    server = await metrics.serve_metrics(*metrics.parse_listen(config.server.metrics))
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import grpc

from kvd import __version__
from kvd.auth import wrap_rpc_handler

__all__ = [
    "CONTENT_TYPE",
    "REGISTRY",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "RpcMetricsInterceptor",
    "parse_listen",
    "serve_metrics",
]

_log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return f"{int(value)}.0" if isinstance(value, float) else str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _CounterChild:
    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up (inc by {amount!r})")
        with self._lock:
            self._value += amount

    def get(self) -> float:
        with self._lock:
            return self._value


class _GaugeChild:
    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def get(self) -> float:
        with self._lock:
            return self._value


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # last slot: above the largest bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        slot = bisect.bisect_left(self._bounds, value)  # first bound >= value: buckets are "le"
        with self._lock:
            self._counts[slot] += 1
            self._sum += value

    @contextlib.contextmanager
    def time(self) -> Iterator[None]:
        """Observe the wall time of the `with` block, in seconds."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start)

    def snapshot(self) -> tuple[list[int], float, int]:
        """(cumulative counts per bound plus +Inf, sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total, running


Child = TypeVar("Child", _CounterChild, _GaugeChild, _HistogramChild)


class _Metric(Generic[Child]):
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 registry: Registry | None = None) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.fullmatch(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name: str = name
        self.help: str = help
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._lock: threading.Lock = threading.Lock()
        self._children: dict[tuple[str, ...], Child] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()
        (REGISTRY if registry is None else registry).register(self)

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: object, **kwargs: object) -> Child:
        """The series for these label values (positional in labelnames order, or by name)."""
        if values and kwargs:
            raise ValueError("pass label values positionally or by name, not both")
        if kwargs:
            if set(kwargs) != set(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(kwargs)}")
            values = tuple(kwargs[n] for n in self.labelnames)
        if len(values) != len(self.labelnames) or not self.labelnames:
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {len(values)} value(s)")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, self._new_child())
        return child

    def remove(self, *values: object) -> None:
        """Forget one labelled series (e.g. a label value that no longer exists)."""
        with self._lock:
            self._children.pop(tuple(str(v) for v in values), None)

    def _unlabelled(self) -> Child:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels(...) first")
        return self._children[()]

    def _items(self) -> list[tuple[tuple[str, ...], Child]]:
        with self._lock:
            return sorted(self._children.items())

    def _samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self._samples())


class Counter(_Metric[_CounterChild]):
    """A value that only goes up. Name it with a _total suffix."""

    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def get(self) -> float:
        return self._unlabelled().get()

    def _samples(self) -> Iterator[str]:
        for values, child in self._items():
            yield f"{self.name}{_label_text(self.labelnames, values)} {_format_value(child.get())}"


class Gauge(_Metric[_GaugeChild]):
    """A value that goes up and down."""

    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled().dec(amount)

    def get(self) -> float:
        return self._unlabelled().get()

    def _samples(self) -> Iterator[str]:
        for values, child in self._items():
            yield f"{self.name}{_label_text(self.labelnames, values)} {_format_value(child.get())}"


DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Histogram(_Metric[_HistogramChild]):
    """Observations counted in cumulative buckets (le = upper bound, inclusive), plus _sum and _count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS, registry: Registry | None = None) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite numbers, got {buckets!r}")
        self.buckets = bounds
        super().__init__(name, help, labelnames, registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def time(self) -> contextlib.AbstractContextManager[None]:
        return self._unlabelled().time()

    def _samples(self) -> Iterator[str]:
        les = [_format_value(b) for b in self.buckets] + ["+Inf"]
        for values, child in self._items():
            cumulative, total, count = child.snapshot()
            for le, c in zip(les, cumulative, strict=True):
                labels = _label_text(self.labelnames, values, f'le="{le}"')
                yield f"{self.name}_bucket{labels} {c}"
            labels = _label_text(self.labelnames, values)
            yield f"{self.name}_sum{labels} {_format_value(total)}"
            yield f"{self.name}_count{labels} {count}"


class Registry:
    """A set of metric families rendered together. Callbacks registered with on_collect run before
    each render, on the rendering thread (the event loop, for serve_metrics), to refresh gauges that
    mirror some other state; one that raises is logged and skipped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric[Any]] = {}
        self._callbacks: list[Callable[[], None]] = []

    def register(self, metric: _Metric[Any]) -> None:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is already registered")
            self._metrics[metric.name] = metric

    def unregister(self, metric: _Metric[Any]) -> None:
        with self._lock:
            self._metrics.pop(metric.name, None)

    def on_collect(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def get(self, name: str) -> _Metric[Any] | None:
        return self._metrics.get(name)

    def render(self) -> str:
        with self._lock:
            callbacks = list(self._callbacks)
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                _log.exception("metrics collect callback failed")
        return "".join(m.render() for m in metrics)


REGISTRY = Registry()


# --- the HTTP endpoint -----------------------------------------------------------------------------

_MAX_HEADER_BYTES = 16 * 1024
_READ_TIMEOUT_S = 10.0


def parse_listen(address: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all interfaces) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address must be host:port, not {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def _response(status: str, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head if head_only else head + body


async def _handle(registry: Registry, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return
        request_line = raw.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            writer.write(_response("400 Bad Request", b"bad request\n", "text/plain"))
        elif parts[1].split("?", 1)[0] != "/metrics":
            writer.write(_response("404 Not Found", b"not found; try /metrics\n", "text/plain"))
        elif parts[0] not in ("GET", "HEAD"):
            writer.write(_response("405 Method Not Allowed", b"method not allowed\n", "text/plain"))
        else:
            body = registry.render().encode()  # on the loop: collect callbacks may read loop-owned state
            writer.write(_response("200 OK", body, CONTENT_TYPE, head_only=parts[0] == "HEAD"))
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def serve_metrics(host: str, port: int, registry: Registry | None = None) -> asyncio.Server:
    """Start answering GET /metrics on host:port (port 0 picks a free one; see server.sockets).
    Close with `server.close(); await server.wait_closed()`."""
    reg = REGISTRY if registry is None else registry

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(reg, reader, writer)

    return await asyncio.start_server(handle, host, port, limit=_MAX_HEADER_BYTES)


# --- kvd's metric families -------------------------------------------------------------------------
# Label values are the proto's enum names in lower case: tier "memory" | "disk"; mode "ids" | "ids_kv" |
# "attention"; index_kind "flat" | "hnsw" | "graph" | "wave"; transport "shm" | "inline".

TIERS = ("memory", "disk")
# Retrieve latency: 50 µs (a tiny call over shared memory) .. 10 s.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUILD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

BUILD_INFO = Gauge("kvd_build_info", "Always 1; the label says which kvd is running.", ["version"])
TIER_BYTES = Gauge("kvd_tier_bytes", "Bytes of KV and indexes held in each tier.", ["tier"])
TIER_BUDGET_BYTES = Gauge("kvd_tier_budget_bytes", "Byte budget of each tier (0 = unlimited).", ["tier"])
SESSIONS = Gauge("kvd_sessions", "Sessions currently held in each tier.", ["tier"])
EVICTIONS = Counter("kvd_evictions_total", "Sessions removed from a tier to respect its budget "
                    "(memory: spilled to disk or dropped; disk: deleted).", ["tier"])
SPILLS = Counter("kvd_spills_total", "Sessions moved from memory to disk.")
SPILL_BYTES = Counter("kvd_spill_bytes_total", "Bytes moved from memory to disk.")
PROMOTIONS = Counter("kvd_promotions_total", "Sessions loaded back from disk into memory.")
PROMOTION_BYTES = Counter("kvd_promotion_bytes_total", "Bytes loaded back from disk into memory.")
RETRIEVE_SECONDS = Histogram("kvd_retrieve_duration_seconds",
                             "Server-side time of one Retrieve call, by mode and index kind.",
                             ["mode", "index_kind"], buckets=LATENCY_BUCKETS)
RETRIEVE_SEQUENCES = Counter("kvd_retrieve_sequences_total",
                             "Sequences (session x layer) answered by Retrieve, by mode.", ["mode"])
APPEND_BYTES = Counter("kvd_append_bytes_total", "Bytes of K and V appended, by transport.", ["transport"])
INDEX_BUILD_QUEUE = Gauge("kvd_index_build_queue_length", "Index builds waiting or running.")
INDEX_BUILD_SECONDS = Histogram("kvd_index_build_duration_seconds",
                                "Time to build one layer's index, by kind.", ["index_kind"],
                                buckets=BUILD_BUCKETS)
INDEX_FAILURES = Counter("kvd_index_failures_total", "Index builds or adds of decode keys that failed (the layer "
                         "is then served by the exact scan; GetSession's IndexStatus.error says why), by kind "
                         "and stage.", ["index_kind", "stage"])
RPC_REQUESTS = Counter("kvd_rpc_requests_total", "RPCs started, by method.", ["method"])
RPC_ERRORS = Counter("kvd_rpc_errors_total", "RPCs that ended with a status other than OK, by method "
                     "and status code.", ["method", "code"])
SHM_REGIONS = Gauge("kvd_shm_regions", "Shared-memory regions registered by clients.")
SHM_REGION_BYTES = Gauge("kvd_shm_region_bytes", "Total size of the registered shared-memory regions.")
for _tier in TIERS:
    TIER_BYTES.labels(_tier)
    TIER_BUDGET_BYTES.labels(_tier)
    SESSIONS.labels(_tier)
    EVICTIONS.labels(_tier)
BUILD_INFO.labels(__version__).set(1)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC in kvd_rpc_requests_total{method} and each non-OK ending in
    kvd_rpc_errors_total{method, code} (code as grpc names it: NOT_FOUND, UNAUTHENTICATED, ...).

    Put it first in the server's interceptor list so that it also sees calls that later interceptors
    (authentication) refuse. `method` is the full name without the leading slash, e.g. "kvd.v1.Kvd/Retrieve";
    unknown methods are not counted (grpc answers UNIMPLEMENTED before any handler runs)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        requests = RPC_REQUESTS.labels(method)

        @contextlib.asynccontextmanager
        async def count(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            requests.inc()
            code: grpc.StatusCode | None = None
            try:
                yield
            except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-call
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            else:
                code = context.code() or grpc.StatusCode.OK
            finally:
                if code is not None and code != grpc.StatusCode.OK:
                    RPC_ERRORS.labels(method, code.name).inc()

        return wrap_rpc_handler(handler, count)
