"""What the core reports about its work, as a protocol: whoever builds the Engine gives it an
implementation (the server's Prometheus metrics), or none."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

__all__ = ["CoreMetrics", "Counter", "Observer", "observe_many"]


class Counter(Protocol):
    def inc(self, amount: int = 1, /) -> None: ...


class Observer(Protocol):
    def observe(self, value: float, /) -> None: ...


def observe_many(observer: Observer, value: float, count: int) -> None:
    """`count` observations of one value: in one step where the observer offers
    `observe_many(value, count)`, else one by one."""
    many = getattr(observer, "observe_many", None)
    if many is not None:
        many(value, count)
        return
    for _ in range(count):
        observer.observe(value)


class CoreMetrics(Protocol):
    """Per-model series. The core asks for a series once and keeps it (the frame path must not
    look labels up per frame)."""

    def frame_counter(self, model: str, status: str) -> Counter:
        """Frames answered with `status` (an ErrorCode name, OK or CANCELLED)."""
        ...

    def batch_observers(self, model: str) -> tuple[Observer, Observer, Observer]:
        """(ORT seconds per batch, frames per batch, seconds from a frame's arrival to its
        answer)."""
        ...

    def gather_observer(self, model: str) -> Observer:
        """Seconds each batch waited, once it could start, for frames arriving."""
        ...

    def watch_queue_depth(self, model: str, read: Callable[[], float]) -> None: ...

    def watch_sessions(self, model: str, read: Callable[[], float]) -> None: ...

    def session_opened(self, model: str) -> None: ...

    def session_ended(self, model: str, reason: str) -> None: ...

    def watch_buffered_bytes(
        self, work: Callable[[], float], rings: Callable[[], float], limit: int
    ) -> None:
        """The memory budget: bytes held for work and for output rings, and its limit."""
        ...

    def watch_session_states(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Sessions by state (active, idle, spilled), as the latest sweep counted them."""
        ...

    def session_spilled(self, model: str) -> None:
        """An idle session left memory; its state stays in the store."""
        ...

    def session_restored(self, model: str, seconds: float) -> None:
        """A spilled session was brought back from the store, taking `seconds`."""
        ...

    def principal_frames(self, principal: str, frames: int, waited: float, refused: bool) -> None:
        """A principal brought `frames`: a stream then waited `waited` s, or a call was refused
        (per-principal series are opt-in: an implementation may ignore this)."""
        ...

    def watch_principal_sessions(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Open sessions by principal, read when metrics are collected."""
        ...

    def model_loaded(self, model: str, version: int, ok: bool) -> None:
        """A load of a model version finished (version 0: the model folder itself failed)."""
        ...

    def model_state(self, model: str, version: int, state: str) -> None:
        """A loaded version's state changed: READY, UNLOADING (draining) or UNAVAILABLE."""
        ...
