"""Bad input gets a clear error naming the problem and leaves the session exactly as it was."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from rnnstream import AsyncClient, RnnstreamError
from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
FAILED = grpc.StatusCode.FAILED_PRECONDITION.value[0]

MODEL = "gru"
X = sequence(MODEL, 6, seed=50)
EXPECTED = ort_full(MODEL, X)

# name -> (request maker taking (session id, next index), code, words the message must hold)
BadStream = Callable[[str, int], pb.StreamRequest]
CASES: dict[str, tuple[BadStream, int, tuple[str, ...]]] = {
    "wrong shape": (
        lambda sid, i: frame_request(sid, i, x_tensor(np.zeros((1, 17), np.float32))),
        INVALID,
        ("'x'", "shape [T, 16]", "[1, 17]"),
    ),
    "wrong rank": (
        lambda sid, i: frame_request(sid, i, x_tensor(np.zeros((1, 1, 16), np.float32))),
        INVALID,
        ("shape [T, 16]", "[1, 1, 16]"),
    ),
    "wrong dtype": (
        lambda sid, i: frame_request(sid, i, x_tensor(np.zeros((1, 16), np.float64))),
        INVALID,
        ("'x'", "must be float32, got float64"),
    ),
    "unknown input name": (
        lambda sid, i: frame_request(sid, i, encode(np.zeros((1, 16), np.float32), "z")),
        INVALID,
        ("no data input 'z'", "['x']"),
    ),
    "unknown session": (
        lambda sid, i: frame_request("no-such-session", 0, x_tensor(X[:1])),
        NOT_FOUND,
        ("unknown session 'no-such-session'",),
    ),
    "unknown model": (
        lambda sid, i: pb.StreamRequest(open=pb.OpenSession(model="nope")),
        NOT_FOUND,
        ("unknown model 'nope'", "gru"),
    ),
    "frame from the future": (
        lambda sid, i: frame_request(sid, i + 3, x_tensor(X[:1])),
        FAILED,
        ("out of order", "expects frame"),
    ),
    "empty frame": (
        lambda sid, i: frame_request(sid, i),
        INVALID,
        ("frame carries no tensors",),
    ),
    "zero time steps": (
        lambda sid, i: frame_request(sid, i, x_tensor(np.zeros((0, 16), np.float32))),
        INVALID,
        ("0 time steps",),
    ),
    "bytes do not match shape": (
        lambda sid, i: frame_request(
            sid, i, pb.Tensor(name="x", dtype=pb.FLOAT32, shape=[2, 16], data=bytes(60))
        ),
        INVALID,
        ("tensor 'x' has 60 bytes", "need 128"),
    ),
    "absurd shape": (
        lambda sid, i: frame_request(
            sid, i, pb.Tensor(name="x", dtype=pb.FLOAT32, shape=[0, 2**62], data=b"")
        ),
        INVALID,
        ("tensor 'x' has an unusable shape",),
    ),
    "unspecified dtype": (
        lambda sid, i: frame_request(sid, i, pb.Tensor(name="x", shape=[1, 16], data=bytes(64))),
        INVALID,
        ("unsupported dtype",),
    ),
    "NaN": (
        lambda sid, i: frame_request(sid, i, x_tensor(np.full((1, 16), np.nan, np.float32))),
        INVALID,
        ("NaN",),
    ),
    "empty request": (lambda sid, i: pb.StreamRequest(), INVALID, ("empty StreamRequest",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_stream_message(server: RunningServer, case: str) -> None:
    make, code, words = CASES[case]
    async with RawStream(server.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        ys = [await raw.frame(sid, i, X[i : i + 1]) for i in range(3)]
        error = await raw.error(make(sid, 3))
        assert error.code == code, error
        for word in words:
            assert word in error.message, (word, error.message)
        # The next valid frame gives exactly what it would have given without the bad message.
        ys += [await raw.frame(sid, i, X[i : i + 1]) for i in range(3, 6)]
        np.testing.assert_allclose(np.concatenate(ys), EXPECTED, rtol=0, atol=1e-5)


async def test_stream_errors_name_session_and_frame(server: RunningServer) -> None:
    async with RawStream(server.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        error = await raw.error(CASES["wrong dtype"][0](sid, 0))
        assert error.session_id == sid
        assert error.HasField("frame_index") and error.frame_index == 0


async def test_async_client_recovers_after_a_rejected_frame(server: RunningServer) -> None:
    """The client's frame numbering does not skip the index of a frame the server refused."""
    async with AsyncClient(server.target) as client:
        session = await client.open(MODEL)
        ys = [(await session.step(X[0]))["y"]]
        with pytest.raises(RnnstreamError) as exc:
            await session.step(np.zeros(17, np.float32))
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.frame_index == 1
        ys += [(await session.step(row))["y"] for row in X[1:]]
        await session.end()
    np.testing.assert_allclose(np.stack(ys), EXPECTED, rtol=0, atol=1e-5)


def _infer(sid: str, *tensors: pb.Tensor, model: str = MODEL) -> pb.InferRequest:
    return pb.InferRequest(model=model, session_id=sid, inputs=list(tensors))


BAD_INFER: dict[str, tuple[Callable[[str], pb.InferRequest], grpc.StatusCode, tuple[str, ...]]] = {
    "wrong shape": (
        lambda sid: _infer(sid, x_tensor(np.zeros((2, 15), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("shape [T, 16]", "[2, 15]"),
    ),
    "wrong dtype": (
        lambda sid: _infer(sid, x_tensor(np.zeros((2, 16), np.int32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("must be float32, got int32",),
    ),
    "unknown model": (
        lambda sid: _infer("", x_tensor(X[:1]), model="nope"),
        grpc.StatusCode.NOT_FOUND,
        ("unknown model 'nope'",),
    ),
    "unknown session": (
        lambda sid: _infer("no-such-session", x_tensor(X[:1])),
        grpc.StatusCode.NOT_FOUND,
        ("unknown session 'no-such-session'",),
    ),
    "frame from the future": (
        lambda sid: pb.InferRequest(
            model=MODEL, session_id=sid, frame_index=7, inputs=[x_tensor(X[:1])]
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        ("frame 7 is out of order", "expects frame 1"),
    ),
    "empty frame": (lambda sid: _infer(sid), grpc.StatusCode.INVALID_ARGUMENT, ("no tensors",)),
    "bytes do not match shape": (
        lambda sid: _infer(
            sid, pb.Tensor(name="x", dtype=pb.FLOAT32, shape=[1, 16], data=bytes(65))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("65 bytes", "need 64"),
    ),
    "session of another model": (
        lambda sid: _infer(sid, x_tensor(np.zeros((1, 64), np.float32)), model="lstm"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("runs model 'gru', not 'lstm'",),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INFER))
async def test_bad_infer(server: RunningServer, case: str) -> None:
    make, code, words = BAD_INFER[case]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.RnnstreamStub(channel)
        async with RawStream(server.target) as raw:
            sid = (await raw.open(MODEL)).session_id
        first = await stub.Infer(_infer(sid, x_tensor(X[:1])))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Infer(make(sid))
        assert exc.value.code() == code
        for word in words:
            assert word in (exc.value.details() or ""), (word, exc.value.details())
        rest = await stub.Infer(_infer(sid, x_tensor(X[1:])))
        assert rest.frame_index == 1
        ys = np.concatenate([decode(first.outputs[0]), decode(rest.outputs[0])])
        np.testing.assert_allclose(ys, EXPECTED, rtol=0, atol=1e-5)
        await stub.EndSession(pb.EndSessionRequest(session_id=sid))


GARBAGE = b"\x0a\xff\xff\x07garbage"  # field 1, length-delimited, length past the end


async def test_garbage_bytes_on_the_stream(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = channel.stream_stream(
            "/rnnstream.v1.Rnnstream/Stream", request_serializer=None, response_deserializer=None
        )()
        await call.write(GARBAGE)
        error = pb.StreamResponse.FromString(await call.read()).error
        assert error.code == INVALID
        assert "not a valid rnnstream.v1.StreamRequest" in error.message
        # The same stream keeps serving.
        await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)).SerializeToString())
        opened = pb.StreamResponse.FromString(await call.read()).opened
        await call.write(frame_request(opened.session_id, 0, x_tensor(X)).SerializeToString())
        output = pb.StreamResponse.FromString(await call.read()).output
        np.testing.assert_allclose(decode(output.outputs[0]), EXPECTED, rtol=0, atol=1e-5)
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("method", ["Infer", "GetModel", "GetSession", "EndSession"])
async def test_garbage_bytes_to_unary_methods(server: RunningServer, method: str) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = channel.unary_unary(
            f"/rnnstream.v1.Rnnstream/{method}",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(GARBAGE)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request is not a valid rnnstream.v1." in (exc.value.details() or "")
        response = await pb_grpc.RnnstreamStub(channel).Infer(_infer("", x_tensor(X)))
        np.testing.assert_allclose(decode(response.outputs[0]), EXPECTED, rtol=0, atol=1e-5)


LIMIT = 32 * 1024


async def test_oversized_request(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(max_message_bytes=LIMIT)
    big = sequence(MODEL, 1000, seed=51)  # 64 000 bytes of input
    async with AsyncClient(running.target) as client:
        session = await client.open(MODEL)
        await session.step(X[0])
        with pytest.raises(RnnstreamError) as exc:
            await client.infer(MODEL, big)
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in exc.value.message
        # An oversized frame ends its stream (gRPC refuses the message before rnnstream sees it).
        async with RawStream(running.target) as raw:
            with pytest.raises(grpc.aio.AioRpcError) as rpc_exc:
                await raw.request(frame_request(session.id, 1, x_tensor(big)))
            assert rpc_exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server keeps serving, and the session is as it was.
        ys = [(await session.step(row))["y"] for row in X[1:]]
        out = await client.infer(MODEL, X)
    np.testing.assert_allclose(out["y"], EXPECTED, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack(ys), EXPECTED[1:], rtol=0, atol=1e-5)


async def test_frame_whose_output_would_be_oversized(
    make_server: Callable[..., RunningServer],
) -> None:
    """An output too big to send is refused before it runs; the stream and session go on."""
    running = make_server(max_message_bytes=LIMIT)
    long = sequence(MODEL, 100, seed=52)  # 6 400 bytes in, 51 200 bytes out
    async with RawStream(running.target) as raw:
        sid = (await raw.open(MODEL)).session_id
        other = (await raw.open(MODEL)).session_id
        ys = [await raw.frame(sid, 0, X[:1])]
        error = await raw.error(frame_request(sid, 1, x_tensor(long)))
        assert error.code == INVALID
        assert "51200 bytes" in error.message and "--max-message-bytes" in error.message
        ys += [await raw.frame(sid, i, X[i : i + 1]) for i in range(1, 6)]
        np.testing.assert_allclose(np.concatenate(ys), EXPECTED, rtol=0, atol=1e-5)
        # The same frame split into smaller ones goes through, on the same stream.
        halves = [await raw.frame(other, i, part) for i, part in enumerate(np.split(long, 4))]
        np.testing.assert_allclose(np.concatenate(halves), ort_full(MODEL, long), rtol=0, atol=1e-5)
    async with AsyncClient(running.target) as client:
        with pytest.raises(RnnstreamError) as exc:
            await client.infer(MODEL, long, session_id=sid)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-message-bytes" in exc.value.message
        info = await client.get_session(sid)
        assert info.next_frame_index == 6
