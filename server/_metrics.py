"""Prometheus metrics of one server, in a registry of its own so servers can share a process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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


class _Observations:
    """A histogram series that also takes many observations of one value at once (the frames
    of a group, answered together), in one step instead of one call per frame."""

    __slots__ = ("_series",)

    def __init__(self, series: Any) -> None:
        self._series = series

    def observe(self, value: float) -> None:
        self._series.observe(value)

    def observe_many(self, value: float, count: int) -> None:
        series = self._series
        # prometheus_client's Histogram keeps these three; observe() adds 1 where this adds count.
        buckets = getattr(series, "_buckets", None)
        bounds = getattr(series, "_upper_bounds", None)
        total = getattr(series, "_sum", None)
        if buckets is None or bounds is None or total is None:
            for _ in range(count):
                series.observe(value)
            return
        total.inc(value * count)
        for bucket, bound in zip(buckets, bounds, strict=True):
            if value <= bound:
                bucket.inc(count)
                break


class _LoopCounters(Collector):
    def __init__(self, counters: list[LoopCounter]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        for counter in self._counters:
            yield CounterMetricFamily(counter.name, counter.documentation, value=counter.value)


class _PrincipalSeries(Collector):
    """Series labelled by principal (--metrics-per-principal): one per principal seen."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._frames = Counter(
            "rnnstream_principal_frames",
            "Frames a principal sent (its unary calls refused for rate included)",
            ["principal"],
            registry=registry,
        )
        self._refused = Counter(
            "rnnstream_principal_refused_frames",
            "Frames of a principal's unary calls refused over its rate limit",
            ["principal"],
            registry=registry,
        )
        self._throttled = Counter(
            "rnnstream_principal_throttled_seconds",
            "Seconds a principal's streams waited, unread, to keep to its rate limit",
            ["principal"],
            registry=registry,
        )
        self._read_sessions: Callable[[], Mapping[str, int]] = dict
        registry.register(self)

    def frames(self, principal: str, frames: int, waited: float, refused: bool) -> None:
        self._frames.labels(principal).inc(frames)
        if refused:
            self._refused.labels(principal).inc(frames)
        if waited > 0:
            self._throttled.labels(principal).inc(waited)

    def watch_sessions(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read_sessions = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "rnnstream_principal_sessions", "Sessions a principal holds open", labels=["principal"]
        )
        for principal, count in sorted(self._read_sessions().items()):
            family.add_metric([principal], count)
        yield family


class _SessionStates(Collector):
    """Sessions by state, as the core's latest sweep of idle sessions counted them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._read: Callable[[], Mapping[str, int]] = dict
        registry.register(self)

    def watch(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "rnnstream_sessions",
            "Sessions by state: active (work queued or running), idle (in memory), spilled "
            "(only in the state store)",
            labels=["state"],
        )
        for state, count in self._read().items():
            family.add_metric([state], count)
        yield family


class Metrics:
    """Every metric rnnstream exports; names are part of the public interface (dashboards)."""

    def __init__(self, per_principal: bool = False) -> None:
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
        self.batch_gather = Histogram(
            "rnnstream_batch_gather_seconds",
            "Time a batch that could start waited for frames arriving (1 ms, checked between "
            "loop turns: plus the turn under way)",
            ["model"],
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1),
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
        self._states = _SessionStates(r)
        self.spills = Counter(
            "rnnstream_session_spills",
            "Idle sessions moved out of memory into the state store (--spill-after)",
            ["model"],
            registry=r,
        )
        self.restores = Counter(
            "rnnstream_session_restores",
            "Spilled sessions brought back from the state store by their next request",
            ["model"],
            registry=r,
        )
        self.restore_latency = Histogram(
            "rnnstream_session_restore_seconds",
            "Time to bring a spilled session back from the state store",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_loads = Counter(
            "rnnstream_model_loads",
            "Loads of a model version, by result (ok, failed); version 0: the model folder",
            ["model", "version", "result"],
            registry=r,
        )
        self.model_versions = Gauge(
            "rnnstream_model_version_state",
            "1 for the state a loaded model version is in (READY, UNLOADING: draining its "
            "sessions, UNAVAILABLE: freed), 0 for the others",
            ["model", "version", "state"],
            registry=r,
        )
        self.buffered = Gauge(
            "rnnstream_buffered_bytes",
            "Tensor bytes held for clients, of --max-buffered-bytes: work (frames read and not "
            "yet answered, answers not yet taken, unary calls) and rings (outputs kept)",
            ["kind"],
            registry=r,
        )
        self.buffered_limit = Gauge(
            "rnnstream_buffered_bytes_limit", "--max-buffered-bytes", registry=r
        )
        self.bytes_received = LoopCounter("rnnstream_bytes_received", "Tensor bytes received")
        self.bytes_sent = LoopCounter("rnnstream_bytes_sent", "Tensor bytes sent")
        # Per frame, these tell how much packing (FrameOutputs, FrameGroup) saves.
        self.stream_requests = LoopCounter(
            "rnnstream_stream_requests", "rnnstream.v1 Stream messages received"
        )
        self.stream_responses = LoopCounter(
            "rnnstream_stream_responses", "rnnstream.v1 Stream messages sent"
        )
        counters = [self.bytes_received, self.bytes_sent, self.stream_requests]
        r.register(_LoopCounters([*counters, self.stream_responses]))
        self._principals = _PrincipalSeries(r) if per_principal else None
        self._http: MetricsEndpoint | None = None

    # -- what the core reports (rnnstream.server.core's CoreMetrics) ---------------------------
    def frame_counter(self, model: str, status: str) -> Any:
        return self.frames.labels(model, status)

    def batch_observers(self, model: str) -> tuple[Any, Any, Any]:
        return (
            self.ort_run.labels(model),
            self.batch_size.labels(model),
            _Observations(self.frame_latency.labels(model)),
        )

    def gather_observer(self, model: str) -> Any:
        return self.batch_gather.labels(model)

    def watch_queue_depth(self, model: str, read: Callable[[], float]) -> None:
        self.queue_depth.labels(model).set_function(read)

    def watch_sessions(self, model: str, read: Callable[[], float]) -> None:
        self.active_sessions.labels(model).set_function(read)

    def session_opened(self, model: str) -> None:
        self.sessions_opened.labels(model).inc()

    def session_ended(self, model: str, reason: str) -> None:
        self.sessions_ended.labels(model, reason).inc()

    def watch_buffered_bytes(
        self, work: Callable[[], float], rings: Callable[[], float], limit: int
    ) -> None:
        self.buffered.labels("work").set_function(work)
        self.buffered.labels("rings").set_function(rings)
        self.buffered_limit.set(limit)

    def watch_session_states(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._states.watch(read)

    def session_spilled(self, model: str) -> None:
        self.spills.labels(model).inc()

    def session_restored(self, model: str, seconds: float) -> None:
        self.restores.labels(model).inc()
        self.restore_latency.labels(model).observe(seconds)

    def principal_frames(self, principal: str, frames: int, waited: float, refused: bool) -> None:
        if self._principals is not None:
            self._principals.frames(principal, frames, waited, refused)

    def watch_principal_sessions(self, read: Callable[[], Mapping[str, int]]) -> None:
        if self._principals is not None:
            self._principals.watch_sessions(read)

    def model_loaded(self, model: str, version: int, ok: bool) -> None:
        self.model_loads.labels(model, str(version), "ok" if ok else "failed").inc()

    def model_state(self, model: str, version: int, state: str) -> None:
        for known in ("READY", "UNLOADING", "UNAVAILABLE"):
            self.model_versions.labels(model, str(version), known).set(int(known == state))

    def serve(self, host: str, port: int, token: str = "") -> int:
        """Expose /metrics over HTTP (behind `token` when given); returns the port bound."""
        self._http = MetricsEndpoint(self.registry, host, port, token)
        return self._http.port

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
