"""run_loadtest: splits the load over workers (a thread, or spawned processes) and merges."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.text import Text

from rnnstream.loadtest._options import LoadtestOptions, OptionsError
from rnnstream.loadtest._report import Report, progress_text
from rnnstream.loadtest._stats import (
    Timeline,
    decode_histogram,
    encode_histogram,
    new_histogram,
    summary_ms,
)
from rnnstream.loadtest._verify import VerifyStats
from rnnstream.loadtest._worker import Share, WorkerFailed, WorkerResult, run_worker

__all__ = ["LoadtestError", "run_loadtest", "split"]

clock = time.monotonic
_START_MARGIN = 0.05  # seconds between "all ready" and the common start
_OPEN_GUARD = 120.0  # most seconds the workers may take to open their sessions...
_OPENS_PER_SECOND = 1000  # ...plus a second per this many sessions


class LoadtestError(Exception):
    """The run could not take place (unreachable server, unknown model, unusable files)."""


def _spread(total: int, parts: int, part: int) -> int:
    return total // parts + (1 if part < total % parts else 0)


def split(options: LoadtestOptions) -> list[Share]:
    """Each worker's sessions, connections (at least one) and part of the open-loop rate."""
    shares: list[Share] = []
    first = 0
    for p in range(options.processes):
        sessions = _spread(options.sessions, options.processes, p)
        total = options.total_rate
        rate = None if total is None else total * sessions / options.sessions
        connections = max(1, _spread(options.connections, options.processes, p))
        shares.append(Share(p, first, sessions, min(connections, sessions), rate))
        first += sessions
    return shares


class _Link:
    """A worker's end of the run: works across threads and, built from spawn objects, processes."""

    def __init__(self, messages: Any, stop: Any, start: Any) -> None:
        self._messages = messages
        self._stop = stop
        self._start = start

    def send(self, message: tuple[Any, ...]) -> None:
        self._messages.put(message)

    def stop_requested(self) -> bool:
        return bool(self._stop.is_set())

    def start_time(self) -> float | None:
        value = float(self._start.value)
        return value if value > 0 else None


def _work(options: LoadtestOptions, share: Share, link: _Link) -> None:
    try:
        result = asyncio.run(run_worker(options, share, link))
    except (WorkerFailed, OptionsError) as exc:
        link.send(("fatal", share.index, str(exc)))
    except BaseException as exc:
        link.send(
            ("fatal", share.index, f"worker {share.index} crashed: {type(exc).__name__}: {exc}")
        )
    else:
        link.send(("done", share.index, result))


def _process_main(
    options: LoadtestOptions, share: Share, messages: Any, stop: Any, start: Any
) -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _work(options, share, _Link(messages, stop, start))


class _StartValue:
    def __init__(self) -> None:
        self.value = 0.0


@dataclass
class Progress:
    """What the live line shows; passed to the caller's callback about twice a second."""

    elapsed: float | None  # measured seconds so far; negative while warming up, None opening
    answered: int
    failed: int
    rate: float  # frames/s over the last second or so
    p99_ms: float | None

    def text(self, warmup: float) -> Text:
        return progress_text(
            self.elapsed, warmup, self.answered, self.failed, self.rate, self.p99_ms
        )


class _Run:
    """The parent's side: starts workers, relays progress, collects and merges results."""

    def __init__(self, options: LoadtestOptions, on_progress: Callable[[Progress], None] | None):
        self.options = options
        self.shares = split(options)
        self.on_progress = on_progress
        self.timeline = Timeline(len(self.shares))
        self.results: dict[int, WorkerResult] = {}
        self.fatal: list[str] = []
        self.ready: set[int] = set()
        self.counts: dict[int, tuple[int, int, int]] = {}
        self.start: float | None = None
        self.interrupted = False
        self._history: deque[tuple[float, int]] = deque(maxlen=8)
        if options.processes == 1:
            self.messages: Any = queue.Queue()
            self.stop: Any = threading.Event()
            self.start_value: Any = _StartValue()
            link = _Link(self.messages, self.stop, self.start_value)
            self.workers: list[Any] = [
                threading.Thread(
                    target=_work,
                    args=(options, self.shares[0], link),
                    name="rnnstream-loadtest",
                    daemon=True,
                )
            ]
        else:
            ctx = multiprocessing.get_context("spawn")
            self.messages = ctx.Queue()
            self.stop = ctx.Event()
            self.start_value = ctx.Value("d", 0.0)
            self.workers = [
                ctx.Process(
                    target=_process_main,
                    name=f"rnnstream-loadtest-{s.index}",
                    args=(options, s, self.messages, self.stop, self.start_value),
                    daemon=True,
                )
                for s in self.shares
            ]

    def run(self) -> Report:
        for worker in self.workers:
            worker.start()
        guard = clock() + _OPEN_GUARD + self.options.sessions / _OPENS_PER_SECOND
        last_progress = 0.0
        while len(self.results) + len(self.fatal) < len(self.workers):
            try:
                self._step(guard)
                if self.start is not None:
                    guard = self.start + self.options.hard_limit + self.options.drain + 30
                if self.on_progress is not None and clock() - last_progress >= 0.5:
                    last_progress = clock()
                    self.on_progress(self._progress())
            except KeyboardInterrupt:
                if self.interrupted:
                    break  # a second Ctrl-C: report what has come in
                self.interrupted = True
                self.stop.set()
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout=5)
            if isinstance(worker, multiprocessing.process.BaseProcess) and worker.is_alive():
                worker.terminate()
        if self.fatal and not self.results:
            raise LoadtestError("; ".join(sorted(set(self.fatal))))
        return self._report()

    def _step(self, guard: float) -> None:
        try:
            message = self.messages.get(timeout=0.1)
        except queue.Empty:
            message = None
        if message is not None:
            self._handle(message)
        if clock() > guard and not self.stop.is_set():
            self.fatal.append("the run overran its time limit and was stopped")
            self.stop.set()
        for worker in self.workers:
            exitcode = getattr(worker, "exitcode", None)
            index = self.workers.index(worker)
            if exitcode not in (None, 0) and index not in self.results:
                self.fatal.append(f"worker {index} died with exit code {exitcode}")
                self.results[index] = _empty_result(index)
                self.stop.set()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, index = message[0], message[1]
        if kind == "ready":
            self.ready.add(index)
            if len(self.ready) == len(self.workers) and self.start is None:
                self.start = clock() + _START_MARGIN
                self.start_value.value = self.start
        elif kind == "tick":
            _, _, sent, answered, failed, seconds = message
            self.counts[index] = (sent, answered, failed)
            self.timeline.add(index, seconds, final=False)
        elif kind == "done":
            result: WorkerResult = message[2]
            self.results[index] = result
            self.timeline.add(index, result.seconds, final=True)
        elif kind == "fatal":
            self.fatal.append(message[2])
            self.timeline.add(index, {}, final=True)
            self.stop.set()  # one worker that cannot run spoils the measurement for all

    def _progress(self) -> Progress:
        now = clock()
        answered = sum(c[1] for c in self.counts.values())
        failed = sum(c[2] for c in self.counts.values())
        self._history.append((now, answered))
        then, before = self._history[0]
        rate = (answered - before) / (now - then) if now > then else 0.0
        elapsed = now - self.start - self.options.warmup if self.start is not None else None
        p99 = (
            summary_ms(self.timeline.total)["p99"]
            if self.timeline.total.get_total_count()
            else None
        )
        return Progress(elapsed, answered, failed, rate, p99)

    def _report(self) -> Report:
        results = list(self.results.values())
        open_latency = new_histogram()
        restored, resident = new_histogram(), new_histogram()
        failed: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        verify = VerifyStats() if self.options.verify else None
        for r in results:
            open_latency.add(decode_histogram(r.open_latency))
            for merged, encoded in ((restored, r.restored_latency), (resident, r.resident_latency)):
                if encoded:
                    merged.add(decode_histogram(encoded))
            failed.update(r.failed)
            refused.update(r.sessions_failed)
            if verify is not None and r.verify is not None:
                verify.add(r.verify)
        timeline = self.timeline.finish()
        duration = max([max(r.last_event, r.sending_ended) for r in results] or [0.0])
        return Report(
            options=self.options,
            sessions_opened=sum(r.sessions_opened for r in results),
            sessions_failed=dict(refused),
            open_latency_ms=summary_ms(open_latency),
            sent=sum(r.sent for r in results),
            answered=sum(r.answered for r in results),
            failed=dict(failed),
            duration_s=duration,
            latency_ms=summary_ms(self.timeline.total),
            timeline=timeline,
            histograms={
                "latency_us": encode_histogram(self.timeline.total),
                "open_latency_us": encode_histogram(open_latency),
                "restored_latency_us": encode_histogram(restored),
                "resident_latency_us": encode_histogram(resident),
            },
            restores=sum(r.restores for r in results),
            restored_latency_ms=summary_ms(restored),
            resident_latency_ms=summary_ms(resident),
            verify=verify,
            interrupted=self.interrupted,
            connections=sum(s.connections for s in self.shares),
            errors=sorted(set(self.fatal)),
        )


def _empty_result(index: int) -> WorkerResult:
    return WorkerResult(index, 0, 0, {}, 0, {}, encode_histogram(new_histogram()), {}, 0.0, 0.0)


def run_loadtest(
    options: LoadtestOptions, on_progress: Callable[[Progress], None] | None = None
) -> Report:
    """Run one load test and return its report. Raises OptionsError or LoadtestError.

    Blocks until the run is over. Ctrl-C (KeyboardInterrupt in the calling thread) stops the
    sending, waits briefly for answers and returns the report of what was measured.
    """
    return _Run(options.checked(), on_progress).run()
