"""The daemon process: grpc.aio on uvloop, Unix socket (and TCP when configured), graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvd import __version__, auth, hugepages, metrics, parallel, sdnotify
from kvd.config import Config
from kvd.engine import Engine
from kvd.fastlane import FastLaneServer
from kvd.service import KvdServicer
from kvd.telemetry import Telemetry
from kvd.v1 import kvd_pb2 as pb
from kvd.v1 import kvd_pb2_grpc as pb_grpc

log = logging.getLogger("kvd.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Kvd"].full_name


class StartupError(RuntimeError):
    pass


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory; remove a stale socket file, refuse if another daemon listens there."""
    socket_path = Path(path)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if not socket_path.exists() and not socket_path.is_symlink():
        return
    if not stat.S_ISSOCK(socket_path.lstat().st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
    except (ConnectionRefusedError, FileNotFoundError):
        socket_path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartupError(f"another process is already serving on {path}")


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    return auth.get_tenant()


def _warm_up_kernels(index_kernels: bool) -> None:
    """Compile (or load from cache) the retrieval kernels, and the graph index's when graphs are the default,
    in the background: off the first Retrieve and the first build."""
    try:
        from kvd import gather_kernels, ingest_kernels, retro, scan_kernels

        gather_kernels.warmup()
        scan_kernels.warmup()
        ingest_kernels.warmup()
        retro.warmup()
        if index_kernels:
            from kvd.index import graph

            graph.warmup()
    except Exception:  # a missing compiler only slows the first calls; they report their own failures
        log.exception("kernel warm-up failed")


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each busy thread its own heap arena; K/V blocks freed on spill then stay resident in
    arenas that are never trimmed. Few arenas keep the resident size close to the memory budget."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).mallopt(-8, arenas)  # M_ARENA_MAX


class Daemon:
    def __init__(self, config: Config) -> None:
        _limit_malloc_arenas()
        hugepages.ENABLED = hugepages.ENABLED and config.storage.huge_pages
        self.config = config
        self.engine = Engine(config)
        workers = config.server.workers or os.cpu_count() or 2
        # Parallelism comes from our own thread pools (requests, sequences, scan chunks, index builds), each
        # torch op running on one thread: OpenMP teams inside many concurrent threads oversubscribe the cores
        # and make every small op wait for descheduled workers (milliseconds per op).
        torch.set_num_threads(1)
        self.pool = ThreadPoolExecutor(max_workers=max(4, workers), thread_name_prefix="kvd-rpc")
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.stopping = asyncio.Event()
        self.addresses: list[str] = []
        self.telemetry = Telemetry(self.engine)
        self.metrics_server: asyncio.Server | None = None
        self.watchdog: asyncio.Task | None = None
        self.warmup: threading.Thread | None = None
        self.servicer: KvdServicer | None = None
        self.fast_lane: FastLaneServer | None = None
        tokens = auth.TokenStore.load(config.server.token_file) if config.server.token_file else None
        self.auth = auth.AuthInterceptor(tokens, allow_insecure_tcp=config.server.allow_insecure_tcp)

    def _build_server(self) -> grpc.aio.Server:
        limit = self.config.server.max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options, interceptors=[metrics.RpcMetricsInterceptor(), self.auth])
        servicer = KvdServicer(self.engine, self.pool, tenant_of, self.telemetry.observe)
        self.servicer = servicer
        pb_grpc.add_KvdServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        return server

    def _bind(self, server: grpc.aio.Server) -> None:
        cfg = self.config.server
        if cfg.socket:
            prepare_socket_path(cfg.socket)
            server.add_insecure_port(f"unix:{cfg.socket}")
            self.addresses.append(f"unix://{cfg.socket}")
        if cfg.tcp:
            if cfg.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                port = server.add_secure_port(cfg.tcp, credentials)
            else:
                port = server.add_insecure_port(cfg.tcp)
            if port == 0:
                raise StartupError(f"cannot listen on {cfg.tcp}")
            host = cfg.tcp.rsplit(":", 1)[0]
            self.addresses.append(f"{host}:{port}")
        if not self.addresses:
            raise StartupError("no listener configured: set server.socket and/or server.tcp")

    async def start(self) -> None:
        sdnotify.status("recovering sessions")
        loop = asyncio.get_running_loop()
        for message in await loop.run_in_executor(None, self.engine.start):
            log.warning(message)
        self.server = self._build_server()
        self._bind(self.server)
        await self.server.start()
        if self.config.server.socket:
            os.chmod(self.config.server.socket, self.config.server.socket_mode)
            if self.config.server.fast_lane:
                self._start_fast_lane()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        # Off the startup path; stop() waits for it: a process exiting while numba compiles aborts (SIGABRT).
        self.warmup = threading.Thread(target=_warm_up_kernels, name="kvd-warmup", daemon=True,
                                       args=(self.config.index.default_kind in ("graph", "hnsw"),))
        self.warmup.start()
        if self.config.server.metrics:
            host, port = metrics.parse_listen(self.config.server.metrics)
            self.metrics_server = await metrics.serve_metrics(host, port)
        sdnotify.ready(f"serving on {', '.join(self.addresses)}")
        interval = sdnotify.watchdog_interval()
        if interval:
            self.watchdog = asyncio.create_task(sdnotify.watchdog_loop(interval, lambda: not self.stopping.is_set()))
        log.info("kvd serving", extra={"fields": {"version": __version__, "addresses": self.addresses,
                                                  "memory_budget": self.engine.registry.memory_budget_bytes,
                                                  "data_dir": self.config.storage.data_dir,
                                                  "region_threads": parallel.region_team()}})

    def _start_fast_lane(self) -> None:
        cfg = self.config.server
        path = f"{cfg.socket}.fast"
        prepare_socket_path(path)
        assert self.servicer is not None
        self.fast_lane = FastLaneServer(path, self.servicer, self.auth, socket_mode=cfg.socket_mode,
                                        max_connections=cfg.fast_lane_connections,
                                        max_bytes=cfg.max_message_mb * 1024 * 1024)
        self.fast_lane.start()
        self.servicer.fast_lane_socket = path
        self.addresses.append(f"fast lane unix://{path}")

    async def stop(self) -> None:
        sdnotify.stopping("draining in-flight calls")
        log.info("shutting down: draining in-flight calls")
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.metrics_server is not None:
            self.metrics_server.close()
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        if self.fast_lane is not None:
            await loop.run_in_executor(None, self.fast_lane.stop, self.config.server.grace_seconds)
        if self.server is not None:
            await self.server.stop(self.config.server.grace_seconds)
        await loop.run_in_executor(None, self.engine.close)
        self.pool.shutdown(wait=True)
        if self.config.server.socket:
            Path(self.config.server.socket).unlink(missing_ok=True)
        if self.warmup is not None and self.warmup.is_alive():
            log.info("waiting for the kernel warm-up to finish")
            await loop.run_in_executor(None, self.warmup.join)
        log.info("kvd stopped")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        await self.stopping.wait()
        await self.stop()


def serve(config: Config) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop works too
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run

    async def main() -> None:
        daemon = Daemon(config)
        await daemon.run()

    with contextlib.suppress(KeyboardInterrupt):
        runner(main())
