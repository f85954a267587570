"""Session state in Redis: one hash per session, written once per batch step in one round trip."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from rnnstream.server.core import (
    Gone,
    ModelSpec,
    SessionRecord,
    SpecOf,
    SpilledSession,
    SpillRecord,
    StateStore,
    StepRecord,
    Unavailable,
)
from rnnstream.server.stores._encoding import (
    decode_result,
    decode_states,
    encode_result,
    encode_states,
)
from rnnstream.server.stores._redis_spill import PREFIX, SpillScripts, member

__all__ = ["LEGACY_KEYS", "RedisStore", "open_store"]

# The first key layout joined principal and id unescaped (rnnstream:session:<owner>:<id>), so
# ("team", "ml:job1") and ("team:ml", "job1") shared one key. They are never read.
_LEGACY_PATTERN = "rnnstream:session:*"
LEGACY_KEYS = ("refuse", "ignore", "delete")

# One call per batch: for each session, its hash gets the new state, next index and the step's
# output in ring slot index % K, its idle TTL (its model's) is renewed, and a spill mark left by
# a spill that a frame overtook is dropped (_redis_spill.py). A control's save (reset, committed
# forecast) keeps the session's latest output in 'last' instead ('' for none); a step drops it
# (the latest output is then the ring's newest). Atomic: a script runs whole.
_SAVE_STEPS = """
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 9
  redis.call('HSET', key, 'model', ARGV[b + 1], 'version', ARGV[b + 2], 'emit', ARGV[b + 3],
             'next', ARGV[b + 4], 'state', ARGV[b + 5])
  if ARGV[b + 9] == '1' then
    redis.call('HSET', key, 'last', ARGV[b + 7])
    redis.call('HDEL', key, 'spilled', 'idle', 'why')
  else
    if ARGV[b + 6] ~= '' then
      redis.call('HSET', key, ARGV[b + 6], ARGV[b + 7])
    end
    redis.call('HDEL', key, 'last', 'spilled', 'idle', 'why')
  end
  local ttl = tonumber(ARGV[b + 8])
  if ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
end
return #KEYS
"""


# Failures of reaching Redis, which pass (a restart, a failover, a network blip): UNAVAILABLE,
# and the client tries again. Every other error (WRONGTYPE on a key written by someone else, a
# script error) would fail the same way again: it is raised as it is, an internal fault.
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)


def _unavailable(exc: RedisError | OSError) -> Unavailable:
    return Unavailable(f"session state store unreachable: {exc}")


class RedisStore:
    """StateStore on a Redis server. Keys: rnnstream:v2:session:<owner>:<session id>, each part
    percent-encoded (':' and '%' included), so no two (owner, id) pairs share a key."""

    def __init__(self, client: redis.Redis, ttl_seconds: float, ring_size: int) -> None:
        """`ttl_seconds`: how long a stored session lives idle when its step names no TTL."""
        self._redis = client
        self._ttl_ms = int(ttl_seconds * 1000)
        self._ring = max(1, ring_size)
        self._save = client.register_script(_SAVE_STEPS)
        self._spills = SpillScripts(client)

    @staticmethod
    def key(owner: str, session_id: str) -> str:
        return PREFIX + member(owner, session_id)

    async def save(self, spec: ModelSpec, steps: Sequence[StepRecord]) -> None:
        keys: list[str] = []
        args: list[bytes | str | int] = []
        for step in steps:
            keys.append(self.key(step.owner, step.session_id))
            ring_field, entry = "", b""
            if step.control:
                entry = b"" if step.result is None else encode_result(step.result)
            elif step.result is not None:
                ring_field = f"r{step.result.index % self._ring}"
                entry = encode_result(step.result)
            args += [step.model, step.version, step.emit, step.next_index]
            args.append(encode_states(step.states))
            ttl_ms = self._ttl_ms if step.ttl is None else int(step.ttl * 1000)
            args += [ring_field, entry, ttl_ms, "1" if step.control else ""]
        try:
            await self._save(keys=keys, args=args)
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def load(
        self,
        specs: SpecOf,
        owner: str,
        session_id: str,
        ttl: float | None = None,
        spilled_only: bool = False,
    ) -> SessionRecord | Gone | None:
        ttl_ms = self._ttl_ms if ttl is None else int(ttl * 1000)
        try:
            kind, fields = await self._spills.claim(owner, session_id, ttl_ms, spilled_only)
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc
        if isinstance(fields, str):
            return Gone(fields)
        if not fields:  # bytes: the client is made without decode_responses
            return None
        model = fields[b"model"].decode()
        version = int(fields.get(b"version", b"1"))  # stored before versions: version 1
        spec = specs(model, version)
        next_index = int(fields[b"next"])
        ring = sorted(
            (decode_result(spec, value) for name, value in fields.items() if name[:1] == b"r"),
            key=lambda r: r.index,
        )
        oldest = next_index - self._ring
        return SessionRecord(
            model=model,
            emit="last" if fields[b"emit"] == b"last" else "every",
            next_index=next_index,
            states=decode_states(spec, fields[b"state"]),
            ring=[r for r in ring if oldest <= r.index < next_index],
            version=version,
            spilled=kind == "spilled",
            last=decode_result(spec, fields[b"last"]) if fields.get(b"last") else None,
            last_kept=b"last" in fields,
        )

    async def delete(self, owner: str, session_id: str) -> None:
        try:
            await self._redis.delete(self.key(owner, session_id))
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def spill(self, spills: Sequence[SpillRecord]) -> list[bool]:
        try:
            return await self._spills.spill(spills)
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def expire_spilled(self, limit: int) -> int:
        try:
            return await self._spills.expire(limit)
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def spilled_count(self) -> int:
        try:
            return await self._spills.count()
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def spilled_page(
        self, owner: str | None, after: str, count: int
    ) -> tuple[list[SpilledSession], str]:
        try:
            return await self._spills.page(owner, after, count)
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def spilled_session(self, owner: str, session_id: str) -> SpilledSession | Gone | None:
        try:
            return await self._spills.session(owner, session_id)
        except _UNREACHABLE as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        await self._redis.aclose()


async def open_store(
    url: str, ttl_seconds: float, ring_size: int, legacy_keys: str = "refuse"
) -> StateStore:
    """Connect to redis://HOST:PORT/DB and check it answers, so a bad URL fails at start-up;
    sessions stored under the old key layout are refused, ignored or deleted (`legacy_keys`)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--state-store {url!r}: expected redis://HOST:PORT/DB")
    if legacy_keys not in LEGACY_KEYS:
        raise ValueError(
            f"--state-store-legacy-keys {legacy_keys!r}: choose from {', '.join(LEGACY_KEYS)}"
        )
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        await client.ping()
        if legacy_keys != "ignore":
            await _legacy_keys(client, url, delete=legacy_keys == "delete")
    except RedisError as exc:
        await client.aclose()
        raise ValueError(f"--state-store {url}: cannot reach Redis: {exc}") from exc
    except ValueError:
        await client.aclose()
        raise
    return RedisStore(client, ttl_seconds, ring_size)


async def _legacy_keys(client: redis.Redis, url: str, *, delete: bool) -> None:
    found = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=_LEGACY_PATTERN, count=1000):
        found += 1
        if not delete:
            break  # one is enough to refuse
        batch.append(key)
        if len(batch) == 1000:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)
    if found and not delete:
        raise ValueError(
            f"--state-store {url} holds sessions under the old key layout {_LEGACY_PATTERN} "
            "(principal and id unescaped, so two principals could share a key); they are never "
            "read. Start with --state-store-legacy-keys delete to delete them, or ignore to "
            "leave them to expire (they cannot be resumed here either way)"
        )
