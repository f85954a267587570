"""Sessions whose next frame should be on its way: how long a batch may wait for more frames."""

from __future__ import annotations

from collections import deque

from server.core._sessions import Session

__all__ = ["ExpectedFrames"]


class ExpectedFrames:
    """Counts the sessions answered within the last `horizon` seconds that have sent nothing
    since: a streaming client answers an output with its next frame, so under load these are
    the frames about to arrive. Idle sessions drop out after `horizon`, so a lone active stream
    among many idle ones expects nothing from them."""

    def __init__(self, horizon: float = 0.1) -> None:
        self._horizon = horizon
        self._answered: deque[tuple[float, Session]] = deque()
        self.count = 0

    def answered(self, session: Session, now: float) -> None:
        """The session's last queued frame was just answered: its next one is expected."""
        if not session.expected_since:
            self.count += 1
        session.expected_since = now
        self._answered.append((now, session))

    def arrived(self, session: Session) -> None:
        """The session sent something (or ended): nothing more is expected of it."""
        if session.expected_since:
            session.expected_since = 0.0
            self.count -= 1

    def expire(self, now: float) -> None:
        limit = now - self._horizon
        answered = self._answered
        while answered and answered[0][0] < limit:
            since, session = answered.popleft()
            if session.expected_since == since:  # not answered again since then
                session.expected_since = 0.0
                self.count -= 1
