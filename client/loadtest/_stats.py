"""Latency histograms (HDR, exact to merge across processes) and per-second counters."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

__all__ = [
    "PERCENTILES",
    "Second",
    "SecondTotals",
    "Timeline",
    "WorkerStats",
    "decode_histogram",
    "mean_us",
    "new_histogram",
    "summary_ms",
]

# Latencies are recorded in microseconds: 1 us to 1000 s at 3 significant digits.
_LOWEST_US = 1
_HIGHEST_US = 1_000_000_000
_DIGITS = 3
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)


def record_seconds(histogram: HdrHistogram, seconds: float, count: int = 1) -> None:
    micros = min(max(round(seconds * 1e6), _LOWEST_US), _HIGHEST_US)
    histogram.record_value(micros, count)


def decode_histogram(encoded: str | bytes) -> HdrHistogram:
    merged = new_histogram()
    merged.decode_and_add(encoded)
    return merged


def encode_histogram(histogram: HdrHistogram) -> str:
    encoded = histogram.encode()
    return encoded.decode("ascii") if isinstance(encoded, bytes) else str(encoded)


def summary_ms(histogram: HdrHistogram) -> dict[str, float | None]:
    """Percentiles, mean and max of a microsecond histogram, in milliseconds."""
    if histogram.get_total_count() == 0:
        return {name: None for name in [*PERCENTILES, "mean", "max"]}
    values = histogram.get_percentile_to_value_dict(list(PERCENTILES.values()))
    out: dict[str, float | None] = {name: values[p] / 1000.0 for name, p in PERCENTILES.items()}
    out["mean"] = mean_us(histogram) / 1000.0
    out["max"] = histogram.get_max_value() / 1000.0
    return out


def mean_us(histogram: HdrHistogram) -> float:
    """The mean HdrHistogram.get_mean_value gives (each count at the middle of its bucket),
    from the non-empty buckets only: hdrh walks every bucket in Python, about 26 ms a call,
    which a load test's coordinator would take from its own worker thread every second."""
    if not histogram.get_total_count():
        return 0.0
    counts = np.ctypeslib.as_array(histogram.counts)
    total = 0
    for index in np.flatnonzero(counts).tolist():
        value = histogram.get_value_from_index(index)
        low = histogram.get_lowest_equivalent_value(value)
        width = histogram.get_highest_equivalent_value(value) - low + 1
        total += int(counts[index]) * (low + width // 2)
    return float(total) / int(histogram.get_total_count())


@dataclass
class Second:
    """Frames answered and failed during one measured second, and their latencies."""

    answered: int = 0
    failed: int = 0
    histogram: HdrHistogram = field(default_factory=new_histogram)

    def encode(self) -> tuple[int, int, str]:
        return self.answered, self.failed, encode_histogram(self.histogram)


@dataclass
class WorkerStats:
    """What one client process measured; every count covers measured frames only."""

    origin: float = 0.0  # monotonic time of measured second 0
    sent: int = 0
    answered: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    sessions_opened: int = 0
    sessions_failed: Counter[str] = field(default_factory=Counter)
    open_latency: HdrHistogram = field(default_factory=new_histogram)
    seconds: dict[int, Second] = field(default_factory=dict)
    last_answer: float = 0.0
    # Measured frames the server answered after bringing their spilled session back from its
    # state store, and the others (their session was in memory): one run, two latencies.
    restores: int = 0
    restored_latency: HdrHistogram = field(default_factory=new_histogram)
    resident_latency: HdrHistogram = field(default_factory=new_histogram)

    def _second(self, now: float) -> Second:
        index = max(0, math.floor(now - self.origin))
        bucket = self.seconds.get(index)
        if bucket is None:
            bucket = self.seconds[index] = Second()
        return bucket

    def answer(self, latency: float, now: float, restored: bool = False, count: int = 1) -> None:
        """`count` frames answered at `now` after `latency` seconds (a group's, together)."""
        self.answered += count
        self.last_answer = max(self.last_answer, now)
        bucket = self._second(now)
        bucket.answered += count
        record_seconds(bucket.histogram, latency, count)
        if restored:
            self.restores += count
            record_seconds(self.restored_latency, latency, count)
        else:
            record_seconds(self.resident_latency, latency, count)

    def fail(self, code: str, now: float) -> None:
        self.failed[code] += 1
        self.last_answer = max(self.last_answer, now)
        self._second(now).failed += 1

    def opened(self, seconds: float) -> None:
        self.sessions_opened += 1
        record_seconds(self.open_latency, seconds)

    def take_seconds(self, now: float | None) -> dict[int, tuple[int, int, str]]:
        """Hand over (and forget) the seconds that are over by `now`; all of them for None."""
        done = [k for k in self.seconds if now is None or self.origin + k + 1 <= now]
        return {k: self.seconds.pop(k).encode() for k in sorted(done)}


@dataclass
class SecondTotals:
    second: int
    answered: int
    failed: int
    latency_ms: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "second": self.second,
            "answered": self.answered,
            "failed": self.failed,
            "p50_ms": self.latency_ms["p50"],
            "p99_ms": self.latency_ms["p99"],
            "max_ms": self.latency_ms["max"],
        }


class Timeline:
    """Merges the seconds every process reports into per-second totals and one histogram."""

    def __init__(self, workers: int) -> None:
        self.total = new_histogram()
        self.answered = 0
        self.failed = 0
        self._open: dict[int, Second] = {}
        self._watermarks = [-1] * workers
        self.closed: dict[int, SecondTotals] = {}

    def add(self, worker: int, seconds: dict[int, tuple[int, int, str]], final: bool) -> None:
        for k, (answered, failed, encoded) in seconds.items():
            bucket = self._open.setdefault(k, Second())
            bucket.answered += answered
            bucket.failed += failed
            if answered:
                histogram = HdrHistogram.decode(encoded)
                bucket.histogram.add(histogram)
                self.total.add(histogram)
            self.answered += answered
            self.failed += failed
        if final:
            self._watermarks[worker] = 1 << 40
        elif seconds:
            self._watermarks[worker] = max(self._watermarks[worker], max(seconds))
        self._close(min(self._watermarks))

    def _close(self, upto: int) -> None:
        # A second is summarised (and its histogram dropped) once every process is past it.
        for k in sorted(k for k in self._open if k <= upto):
            bucket = self._open.pop(k)
            self.closed[k] = SecondTotals(
                k, bucket.answered, bucket.failed, summary_ms(bucket.histogram)
            )

    def finish(self) -> list[SecondTotals]:
        self._close(1 << 41)
        if not self.closed:
            return []
        last = max(self.closed)
        return [
            self.closed.get(k, SecondTotals(k, 0, 0, summary_ms(new_histogram())))
            for k in range(last + 1)
        ]
