"""Prometheus metrics: exposition format, thread-safe updates, the HTTP endpoint, the RPC interceptor."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from kvd import metrics
from kvd.metrics import Counter, Gauge, Histogram, Registry

# One sample line of text format 0.0.4: name, optional {labels}, value (no timestamps from us).
_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\[\\"n])*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, frozenset], float]]:
    """-> ({family: (type, help)}, {(sample name, frozenset(label items)): value}); asserts the format."""
    assert text.endswith("\n")
    families: dict[str, tuple[str, str]] = {}
    helps: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in helps, f"HELP twice for {name}"
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            assert name in helps and name not in families
            families[name] = (kind, helps[name])
            current = name
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"bad sample line {line!r}"
            name, _, label_text, value = match.groups()
            assert current is not None and name in (current, f"{current}_bucket", f"{current}_sum",
                                                    f"{current}_count"), f"{name} outside its family"
            labels: list[tuple[str, str]] = []
            rest = label_text or ""
            while rest:
                lm = _LABEL.match(rest)
                assert lm, f"bad labels in {line!r}"
                labels.append((lm.group(1), _unescape(lm.group(2))))
                rest = rest[lm.end():]
            key = (name, frozenset(labels))
            assert key not in samples, f"duplicate series {line!r}"
            samples[key] = float(value.replace("+Inf", "inf").replace("-Inf", "-inf"))
    return families, samples


def test_counter_gauge_render_and_escaping() -> None:
    reg = Registry()
    c = Counter("t_requests_total", "Requests.\nSecond line with a \\ backslash.", ["path"], registry=reg)
    g = Gauge("t_temperature", "A gauge.", registry=reg)
    c.labels('we"ird\\pa\nth').inc(2)
    c.labels(path="/plain").inc()
    g.set(3.5)
    g.dec(1)
    g.inc(0.25)
    text = reg.render()
    assert "# HELP t_requests_total Requests.\\nSecond line with a \\\\ backslash.\n" in text
    assert 't_requests_total{path="we\\"ird\\\\pa\\nth"} 2.0' in text
    families, samples = parse(text)
    assert families["t_requests_total"][0] == "counter"
    assert families["t_temperature"][0] == "gauge"
    assert samples[("t_requests_total", frozenset({("path", 'we"ird\\pa\nth')}))] == 2
    assert samples[("t_requests_total", frozenset({("path", "/plain")}))] == 1
    assert samples[("t_temperature", frozenset())] == 2.75
    g.set(float("nan"))
    assert "t_temperature NaN" in reg.render()
    g.set(float("-inf"))
    assert "t_temperature -Inf" in reg.render()


def test_misuse_is_refused() -> None:
    reg = Registry()
    c = Counter("t_x_total", "x", ["a"], registry=reg)
    with pytest.raises(ValueError, match="only goes up"):
        c.labels("1").inc(-1)
    with pytest.raises(ValueError, match="labels"):
        c.inc()
    with pytest.raises(ValueError, match="labels"):
        c.labels("1", "2")
    with pytest.raises(ValueError, match="labels"):
        c.labels(b="1")
    with pytest.raises(ValueError, match="already registered"):
        Counter("t_x_total", "again", registry=reg)
    with pytest.raises(ValueError, match="invalid metric name"):
        Gauge("bad-name", "x", registry=reg)
    with pytest.raises(ValueError, match="invalid label name"):
        Histogram("t_h", "x", ["le"], registry=reg)
    with pytest.raises(ValueError, match="buckets"):
        Histogram("t_h2", "x", buckets=[1.0, 1.0], registry=reg)


def test_histogram_buckets_from_many_threads() -> None:
    reg = Registry()
    h = Histogram("t_latency_seconds", "Latency.", ["mode"], buckets=[0.1, 0.5, 1.0], registry=reg)
    c = Counter("t_ops_total", "Ops.", registry=reg)
    values = [0.05, 0.1, 0.2, 0.5, 0.7, 1.0, 3.0]  # 0.1, 0.5 and 1.0 fall on bounds: le is inclusive
    threads_n, rounds = 8, 500

    def work() -> None:
        child = h.labels(mode="ids")
        for _ in range(rounds):
            for v in values:
                child.observe(v)
            c.inc()

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    families, samples = parse(reg.render())
    assert families["t_latency_seconds"][0] == "histogram"
    n = threads_n * rounds

    def bucket(le: str) -> float:
        return samples[("t_latency_seconds_bucket", frozenset({("mode", "ids"), ("le", le)}))]

    assert bucket("0.1") == 2 * n
    assert bucket("0.5") == 4 * n
    assert bucket("1.0") == 6 * n
    assert bucket("+Inf") == 7 * n
    assert samples[("t_latency_seconds_count", frozenset({("mode", "ids")}))] == 7 * n
    assert math.isclose(samples[("t_latency_seconds_sum", frozenset({("mode", "ids")}))], sum(values) * n)
    assert samples[("t_ops_total", frozenset())] == n


def test_histogram_timer_and_collect_callback() -> None:
    reg = Registry()
    h = Histogram("t_block_seconds", "Block time.", buckets=[10.0], registry=reg)
    g = Gauge("t_mirror", "Refreshed at scrape time.", registry=reg)
    with h.time():
        pass
    reg.on_collect(lambda: g.set(42))
    reg.on_collect(lambda: 1 / 0)  # a broken callback must not break the scrape
    _, samples = parse(reg.render())
    assert samples[("t_block_seconds_count", frozenset())] == 1
    assert samples[("t_block_seconds_bucket", frozenset({("le", "10.0")}))] == 1
    assert samples[("t_mirror", frozenset())] == 42


def test_kvd_families_parse() -> None:
    metrics.RETRIEVE_SECONDS.labels(mode="attention", index_kind="flat").observe(0.0003)
    metrics.APPEND_BYTES.labels(transport="shm").inc(1 << 20)
    families, samples = parse(metrics.REGISTRY.render())
    for name, kind in [("kvd_tier_bytes", "gauge"), ("kvd_sessions", "gauge"),
                       ("kvd_evictions_total", "counter"),
                       ("kvd_spills_total", "counter"), ("kvd_promotions_total", "counter"),
                       ("kvd_retrieve_duration_seconds", "histogram"), ("kvd_append_bytes_total", "counter"),
                       ("kvd_index_build_queue_length", "gauge"), ("kvd_rpc_errors_total", "counter"),
                       ("kvd_shm_regions", "gauge"), ("kvd_index_failures_total", "counter")]:
        assert families[name][0] == kind, name
    assert ("kvd_tier_bytes", frozenset({("tier", "memory")})) in samples
    assert ("kvd_sessions", frozenset({("tier", "disk")})) in samples
    labels = frozenset({("mode", "attention"), ("index_kind", "flat"), ("le", "0.0005")})
    assert samples[("kvd_retrieve_duration_seconds_bucket", labels)] >= 1


def test_parse_listen() -> None:
    assert metrics.parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.parse_listen("[::1]:9464") == ("::1", 9464)
    assert metrics.parse_listen(":9464") == ("0.0.0.0", 9464)
    for bad in ("9464", "host:", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            metrics.parse_listen(bad)


def _get(url: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_http_endpoint() -> None:
    reg = Registry()
    Counter("t_scrapes_total", "x", registry=reg).inc(7)

    async def scenario() -> list[tuple[int, str, str]]:
        server = await metrics.serve_metrics("127.0.0.1", 0, registry=reg)
        port = server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        try:
            results = []
            for path, method in [("/metrics", "GET"), ("/metrics?x=1", "GET"), ("/", "GET"),
                                 ("/metrics", "POST"), ("/metrics", "HEAD")]:
                results.append(await asyncio.to_thread(_get, base + path, method))
            # a client that connects and sends garbage must not hurt the server
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"NONSENSE\r\n\r\n")
            await writer.drain()
            assert (await reader.read()).startswith(b"HTTP/1.1 400")
            writer.close()
            results.append(await asyncio.to_thread(_get, base + "/metrics"))
            return results
        finally:
            server.close()
            await server.wait_closed()

    ok, query, root, post, head, again = asyncio.run(scenario())
    assert ok[0] == 200 and ok[1] == "text/plain; version=0.0.4; charset=utf-8"
    assert "t_scrapes_total 7.0" in ok[2]
    parse(ok[2])
    assert query[0] == 200
    assert root[0] == 404
    assert post[0] == 405
    assert head[0] == 200 and head[2] == ""
    assert again[0] == 200


def test_rpc_metrics_interceptor(tmp_path) -> None:
    async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such session")

    async def broken(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("bug")

    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        yield b"a"
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over budget")

    async def endless(request: bytes, context: grpc.aio.ServicerContext):
        while True:
            yield b"x"
            await asyncio.sleep(0.01)

    handlers = {"Endless": grpc.unary_stream_rpc_method_handler(endless),
                "Ok": grpc.unary_unary_rpc_method_handler(ok),
                "Missing": grpc.unary_unary_rpc_method_handler(missing),
                "Broken": grpc.unary_unary_rpc_method_handler(broken),
                "Stream": grpc.unary_stream_rpc_method_handler(stream)}

    def value(method: str, code: str | None = None) -> float:
        if code is None:
            return metrics.RPC_REQUESTS.labels(f"t.M/{method}").get()
        return metrics.RPC_ERRORS.labels(f"t.M/{method}", code).get()

    async def scenario() -> None:
        server = grpc.aio.server(interceptors=[metrics.RpcMetricsInterceptor()])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.M", handlers),))
        address = f"unix:{tmp_path}/m.sock"
        server.add_insecure_port(address)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                assert await channel.unary_unary("/t.M/Ok")(b"x") == b"x"
                for method, code in [("Missing", grpc.StatusCode.NOT_FOUND),
                                     ("Broken", grpc.StatusCode.UNKNOWN)]:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await channel.unary_unary(f"/t.M/{method}")(b"x")
                    assert info.value.code() == code
                call = channel.unary_stream("/t.M/Stream")(b"x")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                endless = channel.unary_stream("/t.M/Endless")(b"x")
                await endless.read()
                endless.cancel()
                for _ in range(200):
                    if value("Endless", "CANCELLED"):
                        break
                    await asyncio.sleep(0.01)
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    assert value("Ok") == 1 and value("Ok", "OK") == 0
    assert value("Missing") == 1 and value("Missing", "NOT_FOUND") == 1
    assert value("Broken", "UNKNOWN") == 1
    assert value("Stream", "RESOURCE_EXHAUSTED") == 1
    assert value("Endless", "CANCELLED") == 1
