"""A resent frame is answered from the output ring only when it carries the inputs it was first
sent with; a frame under an applied index with other inputs is refused, naming the index, here
and on a replica that resumed the session from Redis. Raw streams and unary calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests.conftest import RunningServer
from tests.services import RedisServer
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

MODEL = "gru"
REFUSED = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


async def _refused_resend(raw: RawStream, sid: str, index: int, x: np.ndarray) -> None:
    error = await raw.error(frame_request(sid, index, x_tensor(x)))
    assert error.code == REFUSED.value[0] and error.frame_index == index
    assert f"frame {index} was already applied with other inputs" in error.message


async def test_a_resend_with_other_inputs_is_refused(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(models=(MODEL,))
    x = sequence(MODEL, 5, seed=140)
    other = x[1:2] + 1.0
    async with RawStream(running.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        y = [await raw.frame(sid, i, x[i : i + 1]) for i in range(3)]
        # The same inputs again: answered from the ring, not applied twice.
        np.testing.assert_array_equal(await raw.frame(sid, 1, x[1:2]), y[1])
        await _refused_resend(raw, sid, 1, other)
        await _refused_resend(raw, sid, 1, x[1:3])  # another T, the same first step
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw.stub.Infer(
                pb.InferRequest(session_id=sid, frame_index=2, inputs=[x_tensor(other)])
            )
        assert info.value.code() == REFUSED and "frame 2" in (info.value.details() or "")
        replayed = await raw.stub.Infer(
            pb.InferRequest(session_id=sid, frame_index=2, inputs=[x_tensor(x[2:3])])
        )
        np.testing.assert_array_equal(decode(replayed.outputs[0]), y[2])
        y += [await raw.frame(sid, i, x[i : i + 1]) for i in (3, 4)]  # the state went on
    np.testing.assert_allclose(np.concatenate(y), ort_full(MODEL, x), rtol=0, atol=1e-5)


async def test_the_digest_travels_with_the_stored_ring(
    make_server: Callable[..., RunningServer], redis_server: RedisServer
) -> None:
    a = make_server(models=(MODEL,), state_store=redis_server.url, session_ttl=60)
    b = make_server(models=(MODEL,), state_store=redis_server.url, session_ttl=60)
    x = sequence(MODEL, 3, seed=141)
    async with RawStream(a.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        y = [await raw.frame(sid, i, x[i : i + 1]) for i in range(3)]
    async with RawStream(b.target) as raw:
        resume = pb.OpenSession(model=MODEL, session_id=sid, resume=True)
        assert (await raw.request(pb.StreamRequest(open=resume))).opened.resumed
        await _refused_resend(raw, sid, 1, x[1:2] * 2)
        np.testing.assert_array_equal(await raw.frame(sid, 1, x[1:2]), y[1])
