"""Sessions in Redis stay with their principal: no two (principal, id) pairs share a key, and
keys of the old, ambiguous layout are never read."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.stores import RedisStore
from tests.conftest import MODELS, RunningServer
from tests.services import RedisServer
from tests.startup import assert_refused, run_server
from tests.streaming import frame_request, ort_full, sequence, x_tensor
from tests.tenants import Tenant

MODEL = "gru"
X = sequence(MODEL, 5, seed=82)
Z = sequence(MODEL, 1, seed=83)  # what the attacker sends
TOKENS = ("team=team-token", "team:ml=ml-token")
LEGACY_KEY = "rnnstream:session:team:ml:job1"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


def test_no_two_principal_and_id_pairs_share_a_key() -> None:
    parts = ["", ":", "a", "b", "a:b", "a%3Ab", "%", "%3A", "{tag}", "é", "a b", "*"]
    pairs = list(itertools.product(parts, parts))
    assert len({RedisStore.key(owner, sid) for owner, sid in pairs}) == len(pairs)
    assert RedisStore.key("team", "ml:job1") != RedisStore.key("team:ml", "job1")


async def test_principal_with_a_colon_cannot_reach_another_session(
    make_server: Callable[..., RunningServer], redis_server: RedisServer
) -> None:
    # Before: keys were rnnstream:session:<principal>:<id> unescaped, so principal "team"
    # opening "ml:job1" loaded principal "team:ml"'s session "job1", and a resend of frame 0
    # returned the victim's output.
    running = make_server(
        state_store=redis_server.url, auth_tokens=TOKENS, models=(MODEL,), session_ttl=60
    )
    victim = Tenant(running.target, token="ml-token")
    attacker = Tenant(running.target, token="team-token")
    try:
        async with victim.stream() as mine:
            await mine.open(MODEL, "job1")
            ys = [await mine.frame("job1", i, X[i : i + 1]) for i in range(3)]
            async with attacker.stream() as theirs:
                resume = pb.OpenSession(model=MODEL, session_id="ml:job1", resume=True)
                refused = await theirs.request(pb.StreamRequest(open=resume))
                assert refused.error.code == grpc.StatusCode.NOT_FOUND.value[0]
                assert refused.error.message == "unknown session 'ml:job1'"
                opened = await theirs.open(MODEL, "ml:job1")
                assert not opened.resumed and opened.next_frame_index == 0
                # Frame 0 runs on the attacker's own fresh state and input, and is not answered
                # from the victim's output ring.
                guess = await theirs.request(frame_request("ml:job1", 0, x_tensor(Z)))
                assert guess.WhichOneof("kind") == "output", guess
                (their_y,) = guess.output.outputs
                np.testing.assert_allclose(
                    np.frombuffer(their_y.data, np.float32).reshape(1, -1),
                    ort_full(MODEL, Z),
                    rtol=0,
                    atol=1e-5,
                )
                # Nothing of the attacker's changed the victim's stored session.
                with redis.Redis(port=redis_server.port) as conn:
                    assert int(conn.hget(RedisStore.key("team:ml", "job1"), "next") or -1) == 3
                    assert int(conn.hget(RedisStore.key("team", "ml:job1"), "next") or -1) == 1
            ys += [await mine.frame("job1", i, X[i : i + 1]) for i in range(3, len(X))]
        np.testing.assert_allclose(np.concatenate(ys), ort_full(MODEL, X), rtol=0, atol=1e-5)
    finally:
        await victim.close()
        await attacker.close()


def _store_legacy_session(server: RedisServer) -> None:
    with redis.Redis(port=server.port) as conn:
        conn.hset(LEGACY_KEY, mapping={"model": MODEL, "emit": "every", "next": 3, "state": b""})


def test_old_key_layout_refuses_to_start(redis_server: RedisServer) -> None:
    _store_legacy_session(redis_server)
    flags = ["--model-repository", str(MODELS), "--models", MODEL, "--metrics-port", "0"]
    result = run_server(*flags, "--port", "0", "--state-store", redis_server.url)
    line = assert_refused(result, "holds sessions under the old key layout rnnstream:session:*")
    assert "--state-store-legacy-keys delete" in line
    with redis.Redis(port=redis_server.port) as conn:
        assert conn.exists(LEGACY_KEY) == 1  # refusing deletes nothing


@pytest.mark.parametrize("choice", ["ignore", "delete"])
async def test_old_key_layout_ignored_or_deleted(
    make_server: Callable[..., RunningServer], redis_server: RedisServer, choice: str
) -> None:
    _store_legacy_session(redis_server)
    with redis.Redis(port=redis_server.port) as conn:
        conn.set("unrelated:key", "kept")
    running = make_server(
        state_store=redis_server.url,
        state_store_legacy_keys=choice,
        auth_tokens=TOKENS,
        models=(MODEL,),
        session_ttl=60,
    )
    with redis.Redis(port=redis_server.port) as conn:
        assert conn.exists(LEGACY_KEY) == (1 if choice == "ignore" else 0)
        assert conn.get("unrelated:key") == b"kept"
    # Either way the old record is never read: "team" resuming "ml:job1" finds nothing.
    async with Tenant(running.target, token="team-token").stream() as stream:
        resume = pb.OpenSession(model=MODEL, session_id="ml:job1", resume=True)
        refused = await stream.request(pb.StreamRequest(open=resume))
        assert refused.error.code == grpc.StatusCode.NOT_FOUND.value[0]
