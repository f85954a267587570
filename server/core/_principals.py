"""How fast each principal may send frames: a token bucket per principal."""

from __future__ import annotations

import time
from collections.abc import Callable

from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import ResourceExhausted
from rnnstream.server.core._instruments import CoreMetrics

__all__ = ["PrincipalLimits", "TokenBucket"]

# Buckets of principals that have been quiet long enough to be full again are forgotten (a full
# bucket and no bucket behave the same), checked every this many takes.
_PRUNE_EVERY = 1024


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`. A take may leave it in debt, so that
    callers that wait (streams) share the rate however many of them there are."""

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, cost: float, now: float) -> float:
        """Take `cost` tokens now, into debt if need be; seconds until the debt is paid."""
        self._refill(now)
        self.level -= cost
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def try_take(self, cost: float, now: float) -> float:
        """Take `cost` tokens if they are there (0.0); else take none and return the seconds
        until they will be. A cost above the burst waits only for a full bucket."""
        self._refill(now)
        needed = min(cost, self.burst)
        if self.level >= needed:
            self.level -= cost
            return 0.0
        return (needed - self.level) / self.rate

    def full(self, now: float) -> bool:
        return self.level + (now - self.stamp) * self.rate >= self.burst


class PrincipalLimits:
    """Per-principal frame rate (`rate` frames a second, bursts of `burst`; 0 turns it off),
    reported to `metrics` (per-principal series, when the metrics keep them)."""

    def __init__(
        self,
        rate: float,
        burst: float,
        metrics: CoreMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(1.0, rate)
        self._metrics = metrics
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._takes = 0

    @classmethod
    def from_settings(
        cls, settings: EngineSettings, metrics: CoreMetrics | None = None
    ) -> PrincipalLimits:
        return cls(settings.rate_limit_frames, settings.rate_limit_burst, metrics)

    def _bucket(self, principal: str, now: float) -> TokenBucket:
        self._takes += 1
        if self._takes % _PRUNE_EVERY == 0:
            self._buckets = {p: b for p, b in self._buckets.items() if not b.full(now)}
        bucket = self._buckets.get(principal)
        if bucket is None:
            bucket = self._buckets[principal] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def pace(self, principal: str, frames: int) -> float:
        """Count `frames` against the principal's rate; seconds its caller should wait before
        handing them on (a stream stops reading meanwhile)."""
        wait = 0.0
        if self.rate > 0:
            now = self._clock()
            wait = self._bucket(principal, now).take(frames, now)
        if self._metrics is not None:
            self._metrics.principal_frames(principal, frames, wait, False)
        return wait

    def try_admit(self, principal: str, frames: int) -> float:
        """0.0 when the principal may send `frames` now (counted); else seconds until it may
        (nothing counted)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        return self._bucket(principal, now).try_take(frames, now)

    def admit(self, principal: str, frames: int) -> None:
        """Count `frames` of a unary call, or refuse it: ResourceExhausted with retry_after."""
        wait = self.try_admit(principal, frames)
        if self._metrics is not None:
            self._metrics.principal_frames(principal, frames, 0.0, wait > 0)
        if wait > 0:
            raise ResourceExhausted(
                f"principal {principal!r} is over its rate limit ({self.rate:g} frames/s, bursts "
                f"of {self.burst:g}); retry in {max(1, round(wait * 1000))} ms",
                retry_after=wait,
            )
