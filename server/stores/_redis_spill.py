"""Spilled sessions in Redis: marks on the session hashes, and two sorted sets naming them (by
the time their state leaves the store, and by name for listings)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from urllib.parse import quote, unquote

import redis.asyncio as redis

from rnnstream.server.core import Gone, SpilledSession, SpillRecord

__all__ = ["PREFIX", "SpillScripts", "member"]

PREFIX = "rnnstream:v2:session:"
_DEADLINES = "rnnstream:v2:spilled:until"  # score: unix ms its state leaves the store
_NAMES = "rnnstream:v2:spilled:names"  # score 0: ordered by member, for paging
_NEVER = 2**53  # the score of a session kept for good
# After its time ran out a spilled session's hash is replaced by a small record saying so, so a
# later request hears "expired" rather than "unknown", on every replica.
_GONE_MS = 24 * 3600 * 1000
# A spilled hash outlives its time by this much, so the sweep finds it and leaves the record
# above; if no server sweeps, Redis drops it a little later.
_GRACE_MS = 10 * 60 * 1000

# A session hash's spill marks: 'spilled' (unix ms its time runs out; 0: never), 'idle' (unix
# ms of its last activity) and 'why' (what a request hears once it is gone). A step's save
# deletes them (the session is live again).
_SPILL = f"""
local out = {{}}
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 6
  if redis.call('HGET', key, 'next') == ARGV[b + 1] then
    redis.call('HSET', key, 'spilled', ARGV[b + 3], 'idle', ARGV[b + 4], 'why', ARGV[b + 5])
    local keep = tonumber(ARGV[b + 2])
    if keep > 0 then redis.call('PEXPIRE', key, keep) else redis.call('PERSIST', key) end
    local until_ms = tonumber(ARGV[b + 3])
    if until_ms == 0 then until_ms = {_NEVER} end
    redis.call('ZADD', '{_DEADLINES}', until_ms, ARGV[b + 6])
    redis.call('ZADD', '{_NAMES}', 0, ARGV[b + 6])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# Load a session to resume it: a spilled one is unmarked (live again, its idle TTL renewed), one
# whose time ran out becomes the record saying so. Returns {{status, fields}}.
_CLAIM = f"""
local key, now, ttl = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local gone = redis.call('HGET', key, 'gone')
if gone then return {{'gone', gone}} end
local spilled = redis.call('HGET', key, 'spilled')
if not spilled then
  if ARGV[4] == '1' then return {{'live', {{}}}} end
  return {{'live', redis.call('HGETALL', key)}}
end
redis.call('ZREM', '{_DEADLINES}', ARGV[1])
redis.call('ZREM', '{_NAMES}', ARGV[1])
local until_ms = tonumber(spilled)
if until_ms > 0 and now >= until_ms then
  local why = redis.call('HGET', key, 'why') or 'expired'
  redis.call('DEL', key)
  redis.call('HSET', key, 'gone', why)
  redis.call('PEXPIRE', key, {_GONE_MS})
  return {{'gone', why}}
end
redis.call('HDEL', key, 'spilled', 'idle', 'why')
if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
return {{'spilled', redis.call('HGETALL', key)}}
"""

_EXPIRE = f"""
local now = tonumber(ARGV[1])
local members = redis.call('ZRANGEBYSCORE', '{_DEADLINES}', '-inf', now, 'LIMIT', 0, ARGV[2])
for _, m in ipairs(members) do
  redis.call('ZREM', '{_DEADLINES}', m)
  redis.call('ZREM', '{_NAMES}', m)
  local key = '{PREFIX}' .. m
  local spilled = tonumber(redis.call('HGET', key, 'spilled') or '0')
  if spilled > 0 and spilled <= now then
    local why = redis.call('HGET', key, 'why') or 'expired'
    redis.call('DEL', key)
    redis.call('HSET', key, 'gone', why)
    redis.call('PEXPIRE', key, {_GONE_MS})
  end
end
return #members
"""

_FIELDS = ("model", "version", "next", "idle", "spilled", "gone")


def member(owner: str, session_id: str) -> str:
    """A session's name in the sorted sets: its key without the prefix (both parts escaped)."""
    return f"{quote(owner, safe='')}:{quote(session_id, safe='')}"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class SpillScripts:
    """The spill side of RedisStore (see there for the key layout)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._spill = client.register_script(_SPILL)
        self.claim_script = client.register_script(_CLAIM)
        self._expire = client.register_script(_EXPIRE)

    async def spill(self, spills: Sequence[SpillRecord]) -> list[bool]:
        now = time.time()
        keys: list[str] = []
        args: list[str | int] = []
        for s in spills:
            name = member(s.owner, s.session_id)
            keys.append(PREFIX + name)
            keep = _ms(s.ttl) + _GRACE_MS if s.ttl > 0 else 0
            until = _ms(now + s.ttl) if s.ttl > 0 else 0
            args += [s.next_index, keep, until, _ms(s.idle_since), s.why, name]
        marked = await self._spill(keys=keys, args=args)
        return [bool(m) for m in marked]

    async def claim(
        self, owner: str, session_id: str, ttl_ms: int, spilled_only: bool
    ) -> tuple[str, dict[bytes, bytes] | str]:
        """('live' | 'spilled', the hash's fields), or ('gone', why); ('live', {}) if none (or,
        `spilled_only`, none spilled)."""
        name = member(owner, session_id)
        args: list[str | int] = [name, _ms(time.time()), ttl_ms, "1" if spilled_only else "0"]
        status, body = await self.claim_script(keys=[PREFIX + name], args=args)
        kind = status.decode() if isinstance(status, bytes) else str(status)
        if kind == "gone":
            return kind, body.decode() if isinstance(body, bytes) else str(body)
        flat = list(body)
        return kind, {bytes(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def expire(self, limit: int) -> int:
        return int(await self._expire(args=[_ms(time.time()), limit]))

    async def count(self) -> int:
        return int(await self._redis.zcard(_DEADLINES))

    async def page(
        self, owner: str | None, after: str, count: int
    ) -> tuple[list[SpilledSession], str]:
        if owner is None:
            low, high = "-", "+"
        else:
            prefix = quote(owner, safe="") + ":"
            low, high = "[" + prefix, "[" + prefix + "\xff"
        if after:
            low = "(" + after
        replies = await self._redis.zrangebylex(_NAMES, low, high, start=0, num=count)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in replies]
        found = await self._describe(names)
        stale = [n for n, info in zip(names, found, strict=True) if info is None]
        if stale:
            await self._redis.zrem(_NAMES, *stale)
        sessions = [info for info in found if isinstance(info, SpilledSession)]
        return sessions, (names[-1] if len(names) == count else "")

    async def session(self, owner: str, session_id: str) -> SpilledSession | Gone | None:
        return (await self._describe([member(owner, session_id)], gone=True))[0]

    async def _describe(
        self, names: list[str], gone: bool = False
    ) -> list[SpilledSession | Gone | None]:
        if not names:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(PREFIX + name, _FIELDS)
            pipe.memory_usage(PREFIX + name)
        replies = await pipe.execute()
        found: list[SpilledSession | Gone | None] = []
        for i, name in enumerate(names):
            values, size = replies[2 * i], replies[2 * i + 1]
            model, version, next_index, idle, spilled, why = values
            if gone and why is not None:
                found.append(Gone(why.decode()))
                continue
            if spilled is None or model is None:  # restored, gone, or live again
                found.append(None)
                continue
            owner, _, session_id = name.partition(":")
            found.append(
                SpilledSession(
                    unquote(owner),
                    unquote(session_id),
                    model.decode(),
                    int(version or b"1"),
                    int(next_index or b"0"),
                    int(idle or b"0") / 1000,
                    int(spilled) / 1000,
                    int(size or 0),
                )
            )
        return found
