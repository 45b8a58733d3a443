"""Feeds the Prometheus metrics (kvd.metrics) from the engine: gauges at scrape time, latency per call."""

from __future__ import annotations

import grpc

from kvd import __version__, metrics
from kvd.engine import Engine

_COUNTER_SOURCES = {
    "spills": metrics.SPILLS, "spilled_bytes": metrics.SPILL_BYTES, "promotions": metrics.PROMOTIONS,
    "promoted_bytes": metrics.PROMOTION_BYTES,
}


class Telemetry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._seen: dict[str, float] = {}
        self._retrieve_series: dict[tuple[str, str], tuple] = {}  # looked up once: observe runs on every call
        metrics.BUILD_INFO.labels(__version__).set(1)
        metrics.REGISTRY.on_collect(self.collect)

    def collect(self) -> None:
        engine = self.engine
        in_memory, on_disk = engine.registry.counts()
        metrics.SESSIONS.labels("memory").set(in_memory)
        metrics.SESSIONS.labels("disk").set(on_disk)
        metrics.TIER_BYTES.labels("memory").set(engine.registry.memory_bytes())
        metrics.TIER_BYTES.labels("disk").set(engine.tiering.disk_bytes())
        metrics.TIER_BUDGET_BYTES.labels("memory").set(engine.registry.memory_budget_bytes)
        metrics.TIER_BUDGET_BYTES.labels("disk").set(engine.config.storage.disk_budget)
        metrics.INDEX_BUILD_QUEUE.set(engine.indexes.queue_length())
        metrics.SHM_REGIONS.set(engine.shm.count())
        values = engine.counter_values()
        for name, counter in _COUNTER_SOURCES.items():
            self._advance(name, values.get(name, 0.0), counter)
        self._advance("evictions", values.get("evictions", 0.0), metrics.EVICTIONS.labels("disk"))

    def _advance(self, name: str, value: float, counter: metrics.Counter | object) -> None:
        delta = value - self._seen.get(name, 0.0)
        if delta > 0:
            counter.inc(delta)  # type: ignore[attr-defined]
            self._seen[name] = value

    def observe(self, method: str, code: grpc.StatusCode, seconds: float, labels: dict[str, str]) -> None:
        if method == "Retrieve" and code is grpc.StatusCode.OK:
            key = (labels.get("mode", "attention"), labels.get("index", "flat"))
            if (series := self._retrieve_series.get(key)) is None:
                series = self._retrieve_series[key] = (metrics.RETRIEVE_SECONDS.labels(*key),
                                                       metrics.RETRIEVE_SEQUENCES.labels(key[0]))
            series[0].observe(seconds)
            series[1].inc(float(labels.get("sequences", "1")))
        elif method == "Append" and code is grpc.StatusCode.OK:
            metrics.APPEND_BYTES.labels(labels.get("transport", "inline")).inc(float(labels.get("bytes", "0")))
