"""Frames sent without an index (unary Infer, OIP sequences): each gets its own, and no request
refused or started before it ever makes a well-formed one fail. Driven by raw stubs, as a client
without our library would."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.services import RedisServer
from tests.streaming import RawStream, ort_full, sequence, x_tensor

MODEL = "gru"
CALLERS, CALLS, STEPS = 4, 50, 64


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


async def test_concurrent_infer_calls_each_get_their_own_index(
    make_server: Callable[..., RunningServer],
) -> None:
    """4 callers x 50 Infer calls on one session, no frame_index, one caller also sending frames
    that are refused when they run (NaN): every well-formed call is answered OK with an index of
    its own, the outputs are those of the inputs applied in index order, and the session's next
    index is the number of OK answers."""
    running = make_server(
        models=(MODEL,)
    )  # every batch runs in the thread: others arrive meanwhile
    rng = np.random.default_rng(101)
    answered: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # index -> (x, y)
    refused: list[grpc.StatusCode] = []
    async with RawStream(running.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        stub = raw.stub

        async def caller(number: int) -> None:
            for call in range(CALLS):
                x = rng.standard_normal((STEPS, 16)).astype(np.float32)
                poisoned = number == 0 and call % 5 == 4
                if poisoned:
                    x[3, 2] = np.nan  # passes the checks at the door; refused when it runs
                request = pb.InferRequest(session_id=sid, inputs=[x_tensor(x)])
                try:
                    reply = await stub.Infer(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    assert poisoned, f"a well-formed call was refused: {exc.details()}"
                    refused.append(exc.code())
                    continue
                assert not poisoned, "a frame holding NaN was applied"
                assert reply.frame_index not in answered, f"index {reply.frame_index} twice"
                answered[reply.frame_index] = (x, decode(reply.outputs[0]))

        await asyncio.gather(*(caller(n) for n in range(CALLERS)))
        info = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
    assert refused == [grpc.StatusCode.INVALID_ARGUMENT] * (CALLS // 5)
    ok = CALLERS * CALLS - len(refused)
    assert sorted(answered) == list(range(ok))
    assert info.next_frame_index == ok
    xs = np.concatenate([answered[i][0] for i in range(ok)])
    ys = np.concatenate([answered[i][1] for i in range(ok)])
    np.testing.assert_allclose(ys, ort_full(MODEL, xs), rtol=0, atol=1e-4)


def _oip_request(x: np.ndarray, number: int, sequence: int, start: bool) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL, id=str(number))
    request.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    request.parameters["sequence_id"].uint64_param = sequence
    request.parameters["sequence_start"].bool_param = start
    return request


async def test_sequence_starts_on_a_live_sequence_with_redis_refuse_nothing(
    make_server: Callable[..., RunningServer], redis_server: RedisServer
) -> None:
    """480 requests of one OIP sequence on one stream, a sequence_start on the live sequence every
    20th (each reset is written to Redis while the next requests queue) and a request refused
    when it runs (NaN) now and then: every other request is answered, with the outputs of its
    segment since the last start."""
    running = make_server(models=(MODEL,), state_store=redis_server.url, session_ttl=60)
    rng = np.random.default_rng(102)
    inputs = [rng.standard_normal((4, 16)).astype(np.float32) for _ in range(480)]
    poisoned = {n for n in range(480) if n % 37 == 36 and n % 20}
    for n in poisoned:
        inputs[n][1, 1] = np.inf
    requests = [_oip_request(x, n, 9, start=n % 20 == 0) for n, x in enumerate(inputs)]
    channel = grpc.aio.insecure_channel(running.target)
    try:
        call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()

        async def write_all() -> None:
            for request in requests:
                await call.write(request)
            await call.done_writing()

        writer = asyncio.create_task(write_all())
        responses = {}
        async for response in call:
            responses[int(response.infer_response.id)] = response
        await writer
    finally:
        await channel.close()
    assert sorted(responses) == list(range(480))
    refused = {n for n, r in responses.items() if r.error_message}
    assert refused == poisoned, {n: responses[n].error_message for n in refused - poisoned}
    for start in range(0, 480, 20):
        segment = [n for n in range(start, start + 20) if n not in poisoned]
        x = np.concatenate([inputs[n] for n in segment])
        got = []
        for n in segment:
            out = responses[n].infer_response
            got.append(np.frombuffer(out.raw_output_contents[0], "<f4").reshape(4, 128))
        np.testing.assert_allclose(np.concatenate(got), ort_full(MODEL, x), rtol=0, atol=1e-4)


async def test_a_frame_cancelled_in_the_queue_leaves_no_gap(
    make_server: Callable[..., RunningServer],
) -> None:
    """An Infer whose deadline passes while its frame is queued is not applied; a call queued
    behind it still runs, numbered without a gap."""
    running = make_server(models=(MODEL,))  # every batch runs in the thread
    x = sequence(MODEL, 3, seed=103)
    release = threading.Event()
    probe.block_ort(running.engine, release)
    try:
        async with RawStream(running.target) as raw:
            sid = (await raw.open(MODEL)).session_id
            stub = raw.stub

            def infer(i: int, timeout: float) -> asyncio.Future[pb.InferResponse]:
                request = pb.InferRequest(session_id=sid, inputs=[x_tensor(x[i : i + 1])])
                return asyncio.ensure_future(stub.Infer(request, timeout=timeout))

            first = infer(0, 60)  # taken into a batch that waits for the blocked thread

            def in_flight() -> bool:
                return bool(probe.session(running.engine, "anonymous", sid).in_flight)

            while not running.run(in_flight):
                await asyncio.sleep(0.005)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await infer(1, 0.2)  # queued behind it until its deadline passes
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            after = infer(2, 60)
            await asyncio.sleep(0.05)
            release.set()
            replies = [await first, await after]
    finally:
        release.set()
    assert [r.frame_index for r in replies] == [0, 1]
    y = np.concatenate([decode(r.outputs[0]) for r in replies])
    np.testing.assert_allclose(y, ort_full(MODEL, x[[0, 2]]), rtol=0, atol=1e-5)
