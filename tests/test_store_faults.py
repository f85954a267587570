"""A state store that answers with a fault (not an outage) gets INTERNAL, logged once with its
traceback, not an UNAVAILABLE that a client would retry forever. Real Redis, raw streams."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.stores import RedisStore
from tests.conftest import RunningServer
from tests.services import RedisServer
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

MODEL = "gru"
INTERNAL = grpc.StatusCode.INTERNAL.value[0]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


async def test_a_store_fault_is_internal_and_changes_nothing(
    make_server: Callable[..., RunningServer],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_server(models=(MODEL,), state_store=redis_server.url, session_ttl=60)
    x = sequence(MODEL, 4, seed=130)
    async with RawStream(running.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        y = [await raw.frame(sid, 0, x[:1])]
        key = RedisStore.key("anonymous", sid)
        with redis.Redis(port=redis_server.port) as conn:
            saved = conn.hgetall(key)
            conn.delete(key)
            conn.set(key, "not a hash")  # every write to it now fails with WRONGTYPE
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                error = await raw.error(frame_request(sid, 1, x_tensor(x[1:2])))
                assert error.code == INTERNAL, error
                assert "WRONGTYPE" in error.message and error.frame_index == 1
        tracebacks = [r for r in caplog.records if r.exc_info is not None]
        assert len(tracebacks) == 3  # one per failed batch, none from the transport
        assert all(r.levelno == logging.ERROR for r in tracebacks)
        info = await raw.stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.next_frame_index == 1  # the step was undone
        with redis.Redis(port=redis_server.port) as conn:
            conn.delete(key)
            conn.hset(key, mapping=saved)  # type: ignore[arg-type]
        y += [await raw.frame(sid, i, x[i : i + 1]) for i in (1, 2, 3)]
    np.testing.assert_allclose(np.concatenate(y), ort_full(MODEL, x), rtol=0, atol=1e-5)
