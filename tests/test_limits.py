"""Limits and back-pressure: T per frame, sessions per stream and in total, frames pending per
session, keepalive, deadlines, and what a client hears when the server ends a session.
(Message size limits are tested in test_bad_input.py.)"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from rnnstream import AsyncClient, RnnstreamError, SessionLost
from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from rnnstream.server.transport.grpc._server import _server_options
from tests import probe
from tests.conftest import RunningServer, test_settings
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

MODEL = "gru"
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


async def test_max_steps_per_frame(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(max_steps_per_frame=8)
    x = sequence(MODEL, 9, seed=70)
    async with RawStream(running.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        error = await raw.error(frame_request(sid, 0, x_tensor(x)))
        assert error.code == INVALID and error.frame_index == 0
        assert "9 time steps; the limit is 8" in error.message
        assert "--max-steps-per-frame" in error.message
        # Eight steps are fine, and the refused frame left the session untouched.
        y = await raw.frame(sid, 0, x[:8])
    np.testing.assert_allclose(y, ort_full(MODEL, x[:8]), rtol=0, atol=1e-5)
    channel = grpc.aio.insecure_channel(running.target)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RnnstreamStub(channel).Infer(
                pb.InferRequest(model=MODEL, inputs=[x_tensor(x)])
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()


async def test_max_sessions_per_stream(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(max_sessions_per_stream=2)
    async with RawStream(running.target) as raw:
        first = (await raw.open(MODEL)).session_id
        await raw.open(MODEL)
        error = await raw.error(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
        assert error.code == EXHAUSTED
        assert "--max-sessions-per-stream" in error.message
        # Resuming a session the stream holds is not a new one.
        again = await raw.request(
            pb.StreamRequest(open=pb.OpenSession(model=MODEL, session_id=first))
        )
        assert again.opened.resumed
        # Another stream has its own allowance; ending a session makes room on this one.
        async with RawStream(running.target) as other:
            await other.open(MODEL)
        ended = await raw.request(pb.StreamRequest(end=pb.EndSessionRequest(session_id=first)))
        assert ended.WhichOneof("kind") == "ended"
        await raw.open(MODEL)
    assert running.run(lambda: probe.session_count(running.engine)) == 3


async def test_max_sessions_in_total_across_streams(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(max_sessions=2)
    async with RawStream(running.target) as a, RawStream(running.target) as b:
        await a.open(MODEL)
        await b.open(MODEL)
        error = await b.error(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
        assert error.code == EXHAUSTED and "--max-sessions" in error.message


def _server_held(running: RunningServer) -> tuple[int, int]:
    """(frames queued on the session, responses waiting in the stream's outbox)."""
    queued = probe.max_frames_queued(running.engine)
    outbox = max((c.outbox.qsize() for c in running.server.native.calls), default=0)
    return queued, outbox


async def test_back_pressure_stops_reading(make_server: Callable[..., RunningServer]) -> None:
    """A client that writes without reading is pushed back by flow control; the server holds
    no more than --max-pending-frames frames, and answers, for it."""
    limit = 4
    running = make_server(max_pending_frames=limit)
    frames, steps = 600, 256  # 16 KiB in and 128 KiB out per frame: ~86 MB if nothing pushed back
    x = sequence(MODEL, steps, seed=71)
    async with RawStream(running.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        written = 0

        async def write_all() -> None:
            nonlocal written
            for i in range(frames):
                await raw.call.write(frame_request(sid, i, x_tensor(x)))
                written += 1

        writer = asyncio.create_task(write_all())
        most = (0, 0)
        # Nothing is read for a while: the writes stall and the server stops holding more.
        previous = -1
        for _ in range(200):
            await asyncio.sleep(0.01)
            held = running.run(lambda: _server_held(running))
            most = (max(most[0], held[0]), max(most[1], held[1]))
            if written == previous and written < frames and _ > 50:
                break
            previous = written
        assert not writer.done(), f"every write went through without any reads; held {most}"
        assert written < frames
        assert most[0] <= limit
        # When reading stops, fewer than `limit` answers wait unsent; the frames still queued
        # (at most `limit`) and the one running can add theirs: the bound is 2 * limit + 1.
        assert most[1] <= 2 * limit + 1
        # Reading again lets everything through, in order and correct.
        first_y = None
        for i in range(frames):
            response = await raw.call.read()
            assert response.WhichOneof("kind") == "output", response
            assert response.output.frame_index == i
            if i == 0:
                first_y = decode(response.output.outputs[0])
            held = running.run(lambda: _server_held(running))
            most = (max(most[0], held[0]), max(most[1], held[1]))
        await writer
    assert most[0] <= limit and most[1] <= 2 * limit + 1  # the same bound as above
    np.testing.assert_allclose(first_y, ort_full(MODEL, x), rtol=0, atol=1e-5)


def test_keepalive_and_size_options_reach_grpc() -> None:
    settings = test_settings(keepalive_time=7.5, keepalive_timeout=2.0, max_message_bytes=12345)
    options = dict(_server_options(settings))
    assert options["grpc.keepalive_time_ms"] == 7500
    assert options["grpc.keepalive_timeout_ms"] == 2000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.max_receive_message_length"] == 12345
    assert options["grpc.max_send_message_length"] == 12345


async def test_keepalive_server_serves(make_server: Callable[..., RunningServer]) -> None:
    # Short keepalive: pings flow on an idle stream and it stays usable.
    running = make_server(keepalive_time=0.2, keepalive_timeout=1.0)
    async with AsyncClient(running.target) as client:
        session = await client.open(MODEL)
        await asyncio.sleep(1.0)
        out = await session.step(np.zeros(16, np.float32))
    assert out["y"].shape == (128,)


async def test_unary_deadline_on_a_queued_frame(make_server: Callable[..., RunningServer]) -> None:
    """Infer's deadline is honoured. A frame whose deadline passes while it is queued is not
    applied (its index stays free); one already running when it passes is applied exactly
    once, and a retry of its index is answered from the output ring."""
    running = make_server(models=(MODEL,))  # every batch runs in the thread
    x = sequence(MODEL, 2, seed=72)
    release = threading.Event()
    probe.block_ort(running.engine, release)  # the one ORT thread is busy
    channel = grpc.aio.insecure_channel(running.target)
    stub = pb_grpc.RnnstreamStub(channel)
    try:
        async with AsyncClient(running.target) as client:
            running_one = await client.open(MODEL)
            queued_one = await client.open(MODEL)
            # running_one's frame is taken into a batch (it waits for the thread)...
            first = asyncio.ensure_future(
                stub.Infer(
                    pb.InferRequest(session_id=running_one.id, inputs=[x_tensor(x[:1])]),
                    timeout=0.3,
                )
            )

            def taken() -> bool:
                return probe.session(running.engine, "anonymous", running_one.id).in_flight

            while not running.run(taken):
                await asyncio.sleep(0.01)
            # ...while queued_one's frame waits behind that batch.
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.Infer(
                    pb.InferRequest(session_id=queued_one.id, inputs=[x_tensor(x[:1])]),
                    timeout=0.3,
                )
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await first
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            release.set()
            while running.run(lambda: running.engine.model_stats(MODEL).frames) < 1:
                await asyncio.sleep(0.01)
            assert (await client.get_session(queued_one.id)).next_frame_index == 0
            assert (await client.get_session(running_one.id)).next_frame_index == 1
            # Retries: the queued one runs now as frame 0; the running one's is replayed.
            for session in (queued_one, running_one):
                reply = await stub.Infer(
                    pb.InferRequest(session_id=session.id, frame_index=0, inputs=[x_tensor(x[:1])]),
                    timeout=10,
                )
                np.testing.assert_allclose(
                    decode(reply.outputs[0]), ort_full(MODEL, x[:1]), rtol=0, atol=1e-5
                )
            assert (await client.get_session(queued_one.id)).next_frame_index == 1
            assert (await client.get_session(running_one.id)).next_frame_index == 1
            assert running.run(lambda: running.engine.model_stats(MODEL).frames) == 2
    finally:
        release.set()
        await channel.close()


async def _read_until(raw: RawStream, kind: str) -> pb.StreamResponse:
    while True:
        response = await asyncio.wait_for(raw.call.read(), 10)
        assert response is not grpc.aio.EOF
        if response.WhichOneof("kind") == kind:
            return response


async def test_expiry_notice_then_not_found_expired(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(session_ttl=1.0)
    async with RawStream(running.target) as raw:
        opened = await raw.open(MODEL)
        await raw.frame(opened.session_id, 0, np.zeros((1, 16), np.float32))
        notice = await _read_until(raw, "ended")
        assert notice.ended.session_id == opened.session_id
        assert notice.ended.reason == "expired"
        assert notice.ended.next_frame_index == 1
        error = await raw.error(frame_request(opened.session_id, 1, x_tensor(np.zeros((1, 16)))))
        assert error.code == NOT_FOUND
        assert "expired after 1 s idle" in error.message
        resume = pb.OpenSession(model=MODEL, session_id=opened.session_id, resume=True)
        error = await raw.error(pb.StreamRequest(open=resume))
        assert error.code == NOT_FOUND and "expired" in error.message
    async with AsyncClient(running.target) as client:
        with pytest.raises(RnnstreamError) as info:
            await client.get_session(opened.session_id)
        assert info.value.code == grpc.StatusCode.NOT_FOUND and "expired" in info.value.message
        # A never-existing id is told apart from an expired one.
        with pytest.raises(RnnstreamError) as info:
            await client.get_session("never-was")
        assert info.value.message == "unknown session 'never-was'"


async def test_eviction_notice_and_session_lost(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(max_sessions=1, evict_idle_when_full=True)
    async with RawStream(running.target) as raw:
        victim = (await raw.open(MODEL)).session_id
        async with AsyncClient(running.target) as client:
            newcomer = await client.open(MODEL)  # the cap is 1: the idle session is evicted
            notice = await _read_until(raw, "ended")
            assert (notice.ended.session_id, notice.ended.reason) == (victim, "evicted")
            with pytest.raises(SessionLost) as lost:
                await client.open(MODEL, victim, resume=True)
            assert lost.value.code == grpc.StatusCode.NOT_FOUND
            assert "was evicted" in lost.value.message
            # The client of an evicted session says so on its next call.
            evicted_by = await client.open(MODEL)  # evicts `newcomer`
            with pytest.raises(SessionLost, match="evicted"):
                await newcomer.step(np.zeros(16, np.float32))
            await evicted_by.end()


async def test_back_pressure_on_oip_streams(make_server: Callable[..., RunningServer]) -> None:
    """ModelStreamInfer stops reading while a sequence holds --max-pending-frames queued frames,
    or that many answers wait unsent (it read up to 4096 requests ahead into one sequence, so
    the writes of a client that did not read could all go through: the test failed now and
    then)."""
    limit = 4
    running = make_server(max_pending_frames=limit)
    # 64 KiB in and 512 KiB out per request, 19 MB in all: more than HTTP/2 flow control and
    # socket buffers take in (with 600 requests of 16 KiB, their windows, grown by bandwidth
    # probing, sometimes took every write).
    frames = 300
    x = sequence(MODEL, 1024, seed=73)

    def request(i: int) -> oip.ModelInferRequest:
        r = oip.ModelInferRequest(model_name=MODEL, id=str(i))
        r.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
        r.raw_input_contents.append(x.tobytes())
        r.parameters["sequence_id"].uint64_param = 77
        r.parameters["sequence_start"].bool_param = i == 0
        return r

    channel = grpc.aio.insecure_channel(running.target)
    try:
        call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        written = 0

        async def write_all() -> None:
            nonlocal written
            for i in range(frames):
                await call.write(request(i))
                written += 1
            await call.done_writing()

        writer = asyncio.create_task(write_all())
        previous = -1
        for n in range(200):
            await asyncio.sleep(0.01)
            if written == previous and n > 50:
                break
            previous = written
        assert not writer.done(), "every write went through without any reads"
        # The sequence's queue holds no more than the limit: the stream stopped reading.
        assert running.run(lambda: probe.max_frames_queued(running.engine)) <= limit
        for i in range(frames):
            response = await call.read()
            assert response.error_message == "" and response.infer_response.id == str(i)
        await writer
    finally:
        await channel.close()
