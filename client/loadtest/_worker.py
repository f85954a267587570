"""One client process's share of the load: its connections, sessions and drivers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from rnnstream._aio import AsyncClient
from rnnstream._connection import diagnose
from rnnstream._errors import OpenManyError, RnnstreamError
from rnnstream._session import AsyncSession
from rnnstream.loadtest._driver import RunClock, SessionDriver, clock
from rnnstream.loadtest._frames import FrameSource, GroupFrames
from rnnstream.loadtest._group_driver import GroupDriver
from rnnstream.loadtest._options import LoadtestOptions
from rnnstream.loadtest._schedule import arrival_times, run_schedule
from rnnstream.loadtest._stats import WorkerStats, encode_histogram
from rnnstream.loadtest._verify import Reference, Verifier, VerifyStats

__all__ = ["Link", "Share", "WorkerFailed", "WorkerResult", "run_worker"]

TICK = 0.5  # seconds between progress reports


@dataclass(frozen=True)
class Share:
    """The part of the run one worker drives."""

    index: int
    first_session: int  # global number of its first session (seeds its frames)
    sessions: int
    connections: int
    rate: float | None


@dataclass
class WorkerResult:
    index: int
    sent: int
    answered: int
    failed: dict[str, int]
    sessions_opened: int
    sessions_failed: dict[str, int]
    open_latency: str  # encoded HDR histogram, microseconds
    seconds: dict[int, tuple[int, int, str]]
    last_event: float  # seconds after the origin of the last measured answer or failure
    sending_ended: float  # seconds after the origin when sending stopped
    verify: VerifyStats | None = None
    restores: int = 0
    restored_latency: str = ""  # encoded HDR histograms, microseconds ('' when none)
    resident_latency: str = ""
    stopped: bool = False


class Link(Protocol):
    """How a worker talks to the run that started it (a queue and two flags)."""

    def send(self, message: tuple[Any, ...]) -> None: ...

    def stop_requested(self) -> bool: ...

    def start_time(self) -> float | None: ...


class WorkerFailed(Exception):
    """The worker could not run at all (unknown model, unreachable server, bad options)."""


async def _watch(
    task: asyncio.Future[Any], link: Link, tick: Callable[[], None], deadline: float = float("inf")
) -> bool:
    """Wait for `task` (reporting progress) up to `deadline`; True if a stop was requested."""
    while not task.done():
        await asyncio.wait([task], timeout=max(0.0, min(TICK, deadline - clock())))
        tick()
        if link.stop_requested():
            return True
        if clock() >= deadline:
            break
    return False


def _client_of(k: int, clients: int, per_message: int) -> int:
    """The connection of session k: round robin, a group of sessions sharing one message on one."""
    return (k // per_message) % clients


_OPEN_CHUNK = 256  # sessions opened per OpenSessions message


async def _open_sessions(
    clients: list[AsyncClient], model: str, count: int, stats: WorkerStats, per_message: int
) -> list[tuple[int, AsyncSession]]:
    """Each client opens its sessions, many per message; each session's open latency is its
    message's."""
    mine: dict[int, list[int]] = {}
    for k in range(count):
        mine.setdefault(_client_of(k, len(clients), per_message), []).append(k)

    async def open_on(client: AsyncClient, numbers: list[int]) -> list[tuple[int, AsyncSession]]:
        opened: list[tuple[int, AsyncSession]] = []
        for start in range(0, len(numbers), _OPEN_CHUNK):
            chunk = numbers[start : start + _OPEN_CHUNK]
            started = clock()
            try:
                sessions = await client.open_many(model, len(chunk))
            except OpenManyError as exc:
                sessions = exc.sessions
                for error in exc.errors.values():
                    stats.sessions_failed[error.code.name] += 1
            except RnnstreamError as exc:
                stats.sessions_failed[exc.code.name] += len(chunk)
                continue
            for _ in sessions:
                stats.opened(clock() - started)
            opened += zip(chunk, sessions, strict=False)
        return opened

    found = await asyncio.gather(*(open_on(clients[c], ks) for c, ks in mine.items()))
    return sorted((entry for entries in found for entry in entries), key=lambda e: e[0])


async def _start_time(link: Link) -> float:
    """The common start the run announces once every worker is ready (now, after a stop).

    Returns only once that moment has come: a frame sent earlier would fall before the origin
    and go uncounted, which in a frames-bounded run can leave nothing measured."""
    while (start := link.start_time()) is None:
        if link.stop_requested():
            return clock()
        await asyncio.sleep(0.005)
    await asyncio.sleep(max(0.0, start - clock()))
    return start


async def _bounded(awaitables: list[Awaitable[Any]], seconds: float) -> None:
    if awaitables:
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), seconds)


async def run_worker(options: LoadtestOptions, share: Share, link: Link) -> WorkerResult:
    """Open the share's sessions, wait for the common start, drive them, then tidy up."""
    connection = options.connection().client_kwargs()
    # A channel of its own per connection: gRPC would otherwise share one TCP connection.
    connection["options"] = [*connection["options"], ("grpc.use_local_subchannel_pool", 1)]
    clients = [
        AsyncClient(
            options.target,
            pack_outputs=options.pack_outputs,
            pack_frames=options.pack_frames,
            **connection,
        )
        for _ in range(share.connections)
    ]
    try:
        return await _run(options, share, link, clients)
    finally:
        await _bounded([c.close() for c in clients], 10)


async def _run(
    options: LoadtestOptions, share: Share, link: Link, clients: list[AsyncClient]
) -> WorkerResult:
    try:
        info = await asyncio.wait_for(clients[0].get_model(options.model), 30)
    except RnnstreamError as exc:
        detail = str(exc)
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            # Say what is wrong when it can be told: refused, or TLS on one side only.
            found = await asyncio.to_thread(diagnose, options.connection(), detail)
            detail = found or detail
        raise WorkerFailed(f"model {options.model!r} on {options.target}: {detail}") from None
    except TimeoutError:
        raise WorkerFailed(f"{options.target} did not answer GetModel within 30 s") from None
    source = FrameSource(info, options.seed, options.frames_file)
    verifier = None
    if options.verify and options.verify_model is not None:
        verifier = Verifier(Reference(options.verify_model, info))
    stats = WorkerStats()

    def tick() -> None:
        link.send(
            (
                "tick",
                share.index,
                stats.sent,
                stats.answered,
                sum(stats.failed.values()),
                stats.take_seconds(clock()),
            )
        )

    per_message = options.sessions_per_message
    opening = asyncio.ensure_future(
        _open_sessions(clients, options.model, share.sessions, stats, per_message)
    )
    if await _watch(opening, link, lambda: None):
        opening.cancel()
        await asyncio.wait([opening])
    sessions = [] if opening.cancelled() else opening.result()
    link.send(("ready", share.index))
    start = await _start_time(link)
    stats.origin = start + options.warmup
    seconds = options.send_seconds
    run = RunClock(
        origin=stats.origin,
        send_until=min(
            start + options.hard_limit,
            stats.origin + seconds if seconds is not None else float("inf"),
        ),
        stopping=link.stop_requested(),
    )
    drivers: list[SessionDriver] = []
    groups: list[GroupDriver] = []
    if per_message > 1:
        members: dict[int, list[tuple[int, AsyncSession]]] = {}
        for k, session in sessions:
            members.setdefault(k // per_message, []).append((k, session))
        for number, group in members.items():
            first = share.first_session + group[0][0]
            checks = None if verifier is None else [verifier.session() for _ in group]
            groups.append(
                GroupDriver(
                    clients[_client_of(number * per_message, len(clients), per_message)],
                    [session for _, session in group],
                    GroupFrames(source, first, len(group)),
                    checks,
                    run,
                    stats,
                    options.frames_per_session,
                )
            )
    else:
        drivers = [
            SessionDriver(
                session,
                source.session(share.first_session + k),
                run,
                stats,
                verifier.session() if verifier is not None else None,
                options.window,
                options.frames_per_session,
            )
            for k, session in sessions
        ]
    await asyncio.sleep(max(0.0, start - clock()))
    tasks = [asyncio.ensure_future(_drive(drivers, run, share, options))]
    tasks += [
        asyncio.ensure_future(d.open_loop() if share.rate is not None else d.closed_loop())
        for d in drivers
    ]
    tasks += [asyncio.ensure_future(g.closed_loop()) for g in groups]
    sending = asyncio.ensure_future(asyncio.gather(*tasks))
    stopped = await _watch(sending, link, tick, run.send_until) or link.stop_requested()
    sending_ended = clock() - stats.origin
    if stopped:
        run.stopping = True

    async def settle() -> None:
        # Open-loop sessions may still owe frames that fell due before the end: they go out.
        await asyncio.wait([sending])
        while pending := unanswered():
            await asyncio.wait(pending)

    def unanswered() -> list[asyncio.Future[Any]]:
        pending: list[asyncio.Future[Any]] = [f for d in drivers for f, _, _ in d.window]
        pending += [f for g in groups for f, _, _ in g.window]
        return [f for f in pending if not f.done()]

    drain = asyncio.ensure_future(settle())
    stopped = await _watch(drain, link, tick, clock() + options.drain) or stopped
    for future in (drain, sending):
        future.cancel()
    await asyncio.wait([drain, sending])  # type: ignore[type-var]
    for d in drivers:
        d.abandon(count_unsent=not stopped)
    for g in groups:
        g.abandon(count_unsent=not stopped)
    open_sessions = [d.session for d in drivers] + [s for g in groups for s in g.sessions]
    await _bounded([s.end() for s in open_sessions if not s.ended], 5)
    verify = await verifier.finish() if verifier is not None else None
    last = max((stats.last_answer - stats.origin), 0.0) if stats.last_answer else 0.0
    return WorkerResult(
        index=share.index,
        sent=stats.sent,
        answered=stats.answered,
        failed=dict(stats.failed),
        sessions_opened=stats.sessions_opened,
        sessions_failed=dict(stats.sessions_failed),
        open_latency=encode_histogram(stats.open_latency),
        seconds=stats.take_seconds(None),
        last_event=last,
        sending_ended=max(sending_ended, 0.0),
        verify=verify,
        restores=stats.restores,
        restored_latency=encode_histogram(stats.restored_latency),
        resident_latency=encode_histogram(stats.resident_latency),
        stopped=stopped,
    )


async def _drive(
    drivers: list[SessionDriver], run: RunClock, share: Share, options: LoadtestOptions
) -> None:
    """Open loop: hand out due times until the end. Closed loop: nothing to do."""
    if share.rate is None:
        return
    seed = options.seed * 1000 + share.index
    times = arrival_times(run.origin - options.warmup, share.rate, options.arrivals, seed)
    try:
        await run_schedule(drivers, times, run.send_until, clock, lambda: run.stopping)
    finally:
        for d in drivers:
            d.close()
