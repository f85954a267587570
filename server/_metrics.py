"""Prometheus metrics of one server, in a registry of its own so servers can share a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from rnnstream.server._metrics_http import MetricsEndpoint

__all__ = ["LoopCounter", "Metrics"]

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class LoopCounter:
    """A counter bumped once or twice per frame, always from the event loop's thread: a plain
    integer (no lock, unlike prometheus_client's Counter), read when /metrics is scraped."""

    __slots__ = ("documentation", "name", "value")

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _LoopCounters(Collector):
    def __init__(self, counters: list[LoopCounter]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        for counter in self._counters:
            yield CounterMetricFamily(counter.name, counter.documentation, value=counter.value)


class Metrics:
    """Every metric rnnstream exports; names are part of the public interface (dashboards)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter(
            "rnnstream_frames",
            "Frames answered, by model and status (gRPC status code names, OK, CANCELLED)",
            ["model", "status"],
            registry=r,
        )
        self.frame_latency = Histogram(
            "rnnstream_frame_latency_seconds",
            "Time from receiving a frame to its output",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ort_run = Histogram(
            "rnnstream_ort_run_seconds",
            "ONNX Runtime time per batch",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rnnstream_batch_size",
            "Frames per ONNX Runtime call",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "rnnstream_queue_depth", "Frames waiting to be batched", ["model"], registry=r
        )
        self.active_sessions = Gauge(
            "rnnstream_active_sessions", "Open sessions", ["model"], registry=r
        )
        self.sessions_opened = Counter(
            "rnnstream_sessions_opened", "Sessions opened", ["model"], registry=r
        )
        self.sessions_ended = Counter(
            "rnnstream_sessions_ended",
            "Sessions ended, by reason (client, expired, evicted, shutdown)",
            ["model", "reason"],
            registry=r,
        )
        self.bytes_received = LoopCounter("rnnstream_bytes_received", "Tensor bytes received")
        self.bytes_sent = LoopCounter("rnnstream_bytes_sent", "Tensor bytes sent")
        r.register(_LoopCounters([self.bytes_received, self.bytes_sent]))
        self._http: MetricsEndpoint | None = None

    # -- what the core reports (rnnstream.server.core's CoreMetrics) ---------------------------
    def frame_counter(self, model: str, status: str) -> Any:
        return self.frames.labels(model, status)

    def batch_observers(self, model: str) -> tuple[Any, Any, Any]:
        return (
            self.ort_run.labels(model),
            self.batch_size.labels(model),
            self.frame_latency.labels(model),
        )

    def watch_queue_depth(self, model: str, read: Callable[[], float]) -> None:
        self.queue_depth.labels(model).set_function(read)

    def watch_sessions(self, model: str, read: Callable[[], float]) -> None:
        self.active_sessions.labels(model).set_function(read)

    def session_opened(self, model: str) -> None:
        self.sessions_opened.labels(model).inc()

    def session_ended(self, model: str, reason: str) -> None:
        self.sessions_ended.labels(model, reason).inc()

    def serve(self, host: str, port: int, token: str = "") -> int:
        """Expose /metrics over HTTP (behind `token` when given); returns the port bound."""
        self._http = MetricsEndpoint(self.registry, host, port, token)
        return self._http.port

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
