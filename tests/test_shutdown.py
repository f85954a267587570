"""Graceful shutdown of a real server process on SIGTERM and SIGINT (--grace 4)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnstream import AsyncClient, SessionLost
from rnnstream._mux import RetryPolicy
from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer, test_settings
from tests.server_process import ServerProcess
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

GRACE = 4.0
MODEL = "gru"
FRAMES = 48
STEPS = 4096  # the most one frame may carry: frames that take a while to run
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
# The tests hold dozens of 2 MB answers unread: a budget that lets one stream do so.
ROOMY = ("--max-buffered-bytes", str(2 * 1024**3))


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(
            health_pb2.HealthCheckRequest(service="rnnstream.v1.Rnnstream"), timeout=5
        ).status
        return status


async def _read_to_the_end(
    raw: RawStream,
) -> tuple[dict[int, np.ndarray], list[pb.StreamError], pb.Notice | None]:
    """Outputs by frame index, in-band errors and the shutdown notice, until the stream ends
    with UNAVAILABLE; nothing may follow the notice."""
    outputs: dict[int, np.ndarray] = {}
    errors: list[pb.StreamError] = []
    notice = None
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            response = await asyncio.wait_for(raw.call.read(), 30)
            assert response is not grpc.aio.EOF, "stream ended without a status"
            kind = response.WhichOneof("kind")
            assert notice is None, f"{kind} after the shutdown notice"
            if kind == "output":
                outputs[response.output.frame_index] = decode(response.output.outputs[0])
            elif kind == "error":
                errors.append(response.error)
            else:
                assert kind == "notice", response
                notice = response.notice
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (ended.value.details() or "")
    return outputs, errors, notice


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_graceful_shutdown(sig: signal.Signals) -> None:
    server = ServerProcess("--models", MODEL, "--grace", str(GRACE), *ROOMY)
    try:
        x = sequence(MODEL, FRAMES * STEPS, seed=90)
        async with RawStream(server.target) as raw:
            opened = await raw.open(MODEL)
            for i in range(FRAMES):
                chunk = x[i * STEPS : (i + 1) * STEPS]
                await raw.call.write(frame_request(opened.session_id, i, x_tensor(chunk)))
            first = await raw.call.read()
            assert first.WhichOneof("kind") == "output"
            # Wait until the server has read every frame (not just TCP buffered it).
            get = raw.stub.GetSession
            request = pb.GetSessionRequest(session_id=opened.session_id)
            while (info := await get(request)).next_frame_index + info.pending_frames < FRAMES - 1:
                await asyncio.sleep(0.005)
            assert info.next_frame_index < FRAMES - 1, "the frames ran too fast to test a drain"
            # Most frames are still queued or running when the signal arrives.
            sent = server.signal(sig)
            # Health turns NOT_SERVING at once (well before the queued frames are done).
            while (status := await asyncio.to_thread(_health, server.target)) != (
                health_pb2.HealthCheckResponse.NOT_SERVING
            ):
                assert status == health_pb2.HealthCheckResponse.SERVING
                assert time.monotonic() - sent < 2
            # New sessions are refused, on a new stream and on this one; new frames too.
            async with RawStream(server.target) as late:
                refused = await late.error(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
                assert refused.code == UNAVAILABLE
                assert "shutting down" in refused.message
            await raw.call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
            await raw.call.write(frame_request(opened.session_id, FRAMES, x_tensor(x[:1])))
            # Every frame received before the signal is answered: run, or refused in-band with
            # UNAVAILABLE if it could not run within the grace; then the notice, then UNAVAILABLE.
            outputs, errors, notice = await _read_to_the_end(raw)
        outputs[0] = decode(first.output.outputs[0])
        assert notice is not None and notice.kind == "shutdown"
        refused = sorted(e.frame_index for e in errors if e.session_id and e.frame_index < FRAMES)
        # Frames run in order: the ones answered come first, the ones refused after them.
        ran = len(outputs)
        assert sorted(outputs) == list(range(ran)) and refused == list(range(ran, FRAMES))
        y = np.concatenate([outputs[i] for i in range(ran)])
        np.testing.assert_allclose(y, ort_full(MODEL, x[: ran * STEPS]), rtol=0, atol=1e-4)
        # The late open and the late frame were refused in-band with UNAVAILABLE too.
        assert {e.code for e in errors} == {UNAVAILABLE}
        assert len(errors) == len(refused) + 2
        assert any(e.frame_index == FRAMES for e in errors)
        assert server.wait(GRACE + 5) == 0
        exited = server.exited_at - sent
        # Within --grace, plus the interpreter's own exit.
        assert exited < GRACE + 2, f"exited {exited:.1f} s after the signal"
    finally:
        server.close()
    assert any("shutting down within 4.0 s" in line for line in server.lines)


@pytest.mark.parametrize("grace", ["0", "0.5"])
async def test_frames_read_are_answered_at_any_grace(grace: str) -> None:
    """With a grace too short to run what is queued, every frame the server has read (native
    stream and OIP stream alike) is still answered before the stream closes: run, or refused
    in-band with UNAVAILABLE; then the stream ends with UNAVAILABLE."""
    frames = 24
    server = ServerProcess("--models", MODEL, "--grace", grace, *ROOMY)
    try:
        x = sequence(MODEL, STEPS, seed=92)
        async with RawStream(server.target) as raw:
            sid = (await raw.open(MODEL)).session_id
            for i in range(frames):
                await raw.call.write(frame_request(sid, i, x_tensor(x)))
            requests = []
            for i in range(frames):
                request = oip.ModelInferRequest(model_name=MODEL, id=str(i))
                request.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
                request.raw_input_contents.append(x.tobytes())
                request.parameters["sequence_id"].uint64_param = 5
                request.parameters["sequence_start"].bool_param = i == 0
                requests.append(request)
            oip_call = oip_grpc.GRPCInferenceServiceStub(raw.channel).ModelStreamInfer()
            for request in requests:
                await oip_call.write(request)

            async def read_everything() -> bool:
                got = [
                    await raw.stub.GetSession(pb.GetSessionRequest(session_id=s))
                    for s in (sid, "oip-5")
                ]
                return all(i.next_frame_index + i.pending_frames >= frames - 1 for i in got)

            while True:  # the server has read every frame (the one running aside)
                try:
                    if await read_everything():
                        break
                except grpc.aio.AioRpcError:  # sequence 5 not opened yet
                    pass
                await asyncio.sleep(0.005)
            sent = server.signal(signal.SIGTERM)
            outputs, errors, notice = await _read_to_the_end(raw)
            answers = [await asyncio.wait_for(oip_call.read(), 30) for _ in range(frames)]
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(oip_call.read(), 30)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert notice is not None and notice.kind == "shutdown"
        assert {e.code for e in errors} == {UNAVAILABLE}
        refused = sorted(e.frame_index for e in errors)
        assert sorted([*outputs, *refused]) == list(range(frames))
        assert [int(a.infer_response.id) for a in answers] == list(range(frames))
        for answer in answers:
            assert (
                answer.error_message == ""
                or "shutting down" in answer.error_message
                or ("stopped" in answer.error_message)
            ), answer.error_message
        assert server.wait(10) == 0
        assert server.exited_at - sent < 5
    finally:
        server.close()


async def test_client_reconnects_after_shutdown_and_reports_lost_sessions(
    make_server: Callable[..., RunningServer],
) -> None:
    """A server going away sends UNAVAILABLE in-band; the client reconnects to whatever serves
    the address next. That fresh server lacks the session: the client says it is lost."""
    first = RunningServer(test_settings(models=(MODEL,)))
    retry = RetryPolicy(max_attempts=100, initial_backoff=0.02, max_backoff=0.2)
    x = sequence(MODEL, 2, seed=91)
    async with AsyncClient(first.target, retry=retry) as client:
        session = await client.open(MODEL)
        await session.step(x[0])
        await asyncio.to_thread(first.stop)
        replacement = make_server(models=(MODEL,), port=first.port)
        with pytest.raises(SessionLost) as lost:
            await asyncio.wait_for(session.step(x[1]), 20)
        assert "unknown session" in lost.value.message
        # Later calls say so at once, and the client goes on with new sessions.
        with pytest.raises(SessionLost):
            await asyncio.wait_for(session.step(x[1]), 5)
        fresh = await asyncio.wait_for(client.open(MODEL), 20)
        y = (await fresh.step(x[0]))["y"]
        await fresh.end()
    np.testing.assert_allclose(y, ort_full(MODEL, x[:1])[0], rtol=0, atol=1e-5)
    assert replacement.run(lambda: probe.session_count(replacement.engine)) == 0
