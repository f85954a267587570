"""The state store interface: where session state is persisted between steps, so another replica
can resume a session."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from rnnstream.server.core._models import ModelSpec
from rnnstream.server.core._results import Emit, FrameOutput

__all__ = [
    "Gone",
    "SessionRecord",
    "SpecOf",
    "SpillRecord",
    "SpilledSession",
    "StateStore",
    "StepRecord",
]

Arrays = list[npt.NDArray[Any]]
SpecOf = Callable[[str, int], ModelSpec]


@dataclass(frozen=True)
class StepRecord:
    """One session after one batch step: written before the step's outputs are sent."""

    owner: str
    session_id: str
    model: str
    emit: Emit
    next_index: int
    states: Arrays  # per session: each state without its batch axis
    result: FrameOutput | None  # the step's outputs, for the output ring
    version: int = 1  # the model version the session is pinned to
    ttl: float | None = None  # seconds the stored session lives idle (its model's; 0: forever)
    # A control's save (reset, committed forecast): `result` is then the session's latest
    # output as the control left it (None: none), kept apart from the output ring.
    control: bool = False


@dataclass(frozen=True)
class SessionRecord:
    """A stored session, as loaded to resume it."""

    model: str
    emit: Emit
    next_index: int
    states: Arrays
    ring: list[FrameOutput]  # oldest first
    version: int = 1  # records stored before versions existed are version 1
    spilled: bool = False  # it had been spilled (the load took it back out of the store)
    # Its latest output as a control left it (last_kept), else the ring's entry for the frame
    # before next_index.
    last: FrameOutput | None = None
    last_kept: bool = False


@dataclass(frozen=True)
class Gone:
    """A spilled session whose time in the store ran out: `why` says so to whoever asks."""

    why: str


@dataclass(frozen=True)
class SpillRecord:
    """A session leaving memory: its state is already stored (every step is); the store marks
    it spilled, if it holds it at `next_index`, to be kept `ttl` seconds (0: for good)."""

    owner: str
    session_id: str
    next_index: int
    ttl: float
    idle_since: float  # unix time of its last activity
    why: str  # what a request hears once its time in the store ran out


@dataclass(frozen=True)
class SpilledSession:
    """A spilled session as a listing shows it, read from the store."""

    owner: str
    session_id: str
    model: str
    version: int
    next_index: int
    idle_since: float  # unix time
    kept_until: float  # unix time its state leaves the store; 0: never
    store_bytes: int


class StateStore(Protocol):
    """Persistence of session state. A call raises Unavailable when the store cannot be reached
    (the client may try again later); any other exception is a fault (INTERNAL)."""

    async def save(self, spec: ModelSpec, steps: Sequence[StepRecord]) -> None:
        """Write every step in one round trip."""

    async def load(
        self,
        specs: SpecOf,
        owner: str,
        session_id: str,
        ttl: float | None = None,
        spilled_only: bool = False,
    ) -> SessionRecord | Gone | None:
        """The stored session, or None when the store has none under that owner and id (or,
        `spilled_only`, none spilled), or Gone once a spilled session's time ran out. A spilled
        session is taken back out of the spilled ones (to live `ttl` seconds idle, as a step
        would renew it).
        `specs(model, version)` describes the stored model version, or raises (an
        RnnstreamError) when this server does not serve it."""

    async def spill(self, spills: Sequence[SpillRecord]) -> list[bool]:
        """Mark stored sessions spilled in one round trip; for each, whether it was (the store
        held it at that next index)."""

    async def expire_spilled(self, limit: int) -> int:
        """Turn up to `limit` spilled sessions whose time ran out into Gone; how many."""

    async def spilled_count(self) -> int: ...

    async def spilled_page(
        self, owner: str | None, after: str, count: int
    ) -> tuple[list[SpilledSession], str]:
        """Up to `count` spilled sessions of `owner` (None: all) after the cursor `after`
        ('' first), in a fixed order, and the cursor of the next ('' at the end)."""

    async def spilled_session(
        self, owner: str, session_id: str
    ) -> SpilledSession | Gone | None: ...

    async def delete(self, owner: str, session_id: str) -> None: ...

    async def close(self) -> None: ...
