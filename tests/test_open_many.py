"""Opening many sessions in one message (OpenSessions): each as its own open would be."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from rnnstream import AsyncClient, OpenManyError
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests.conftest import RunningServer
from tests.streaming import RawStream, assert_matches_references, sequence


async def test_many_sessions_open_in_one_message(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(max_sessions_per_stream=12)
    x = sequence("gru", 3, seed=195)
    async with AsyncClient(running.target) as client:
        first = await client.open("gru")
        await first.step(x[0])
        sessions = await client.open_many("gru", 10)
        assert len({s.id for s in sessions}) == 10 and first.id not in {s.id for s in sessions}
        outputs = await client.step_many({s: x[0] for s in sessions})
        for s in sessions:
            ys = [outputs[s]["y"]] + [(await s.step(row))["y"] for row in x[1:]]
            assert_matches_references("gru", x, np.stack(ys))
        # A resume among new ones, up to the stream's cap (11 held, 12 allowed): each alone.
        with pytest.raises(OpenManyError) as refused:
            await client.open_many("gru", session_ids=[first.id, "new-one", "another"])
        error = refused.value
        assert [s.id for s in error.sessions] == [first.id, "new-one"]
        assert error.sessions[0].resumed and error.sessions[0].next_index == 1
        assert list(error.errors) == [2]
        assert error.errors[2].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with RawStream(running.target) as raw:
        request = pb.OpenSessions(
            request_id=7,
            sessions=[pb.OpenSession(model="gru"), pb.OpenSession(model="nope")],
        )
        answer = (await raw.request(pb.StreamRequest(open_many=request))).opened_many
        assert answer.request_id == 7 and len(answer.results) == 2
        assert answer.results[0].opened.model == "gru" and answer.results[0].opened.session_id
        assert answer.results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert "nope" in answer.results[1].error.message


async def test_an_answer_read_while_its_request_is_written_is_not_lost(
    make_server: Callable[..., RunningServer],
) -> None:
    """The answer to an OpenSessions can be read before the client's write of it returns;
    the client waited for it only after the write, so now and then (about one call in a hundred)
    it dropped the answer and waited forever. 400 calls in a row all come back."""
    running = make_server()
    async with AsyncClient(running.target) as client:
        for _ in range(400):
            (session,) = await asyncio.wait_for(client.open_many("gru", 1), timeout=10)
            assert session.id


async def test_cancelled_calls_leave_nothing_waiting_in_the_client(
    make_server: Callable[..., RunningServer],
) -> None:
    """An OpenSessions answer that comes back after its call was cancelled has nobody to go
    to: the client kept it, one per cancelled call, until the stream reconnected."""
    running = make_server()
    async with AsyncClient(running.target) as client:
        await client.open_many("gru", 1)  # the stream is up
        mux = client._mux
        assert mux is not None
        cancelled = 0
        for _ in range(20):
            call = asyncio.ensure_future(client.open_many("gru", 1))
            # Written, the call waits for its answer (unless the answer came with the write).
            async with asyncio.timeout(10):
                while not mux._opens and not call.done():
                    await asyncio.sleep(0)
            if call.done():
                continue
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            cancelled += 1
        assert cancelled  # some calls were cancelled while their answer was on its way
        (session,) = await asyncio.wait_for(client.open_many("gru", 1), timeout=10)
        assert session.id  # answers after the cancelled ones still come back
        await asyncio.sleep(0.2)  # the cancelled calls' answers have come in by now
        kept = [
            value
            for field in vars(mux).values()
            if isinstance(field, dict)
            for value in field.values()
            if isinstance(value, (pb.SessionsOpened, asyncio.Future))
        ]
        assert kept == []
