"""FrameGroup on the wire (raw stubs): one frame for each of many sessions in one message, one
GroupOutputs back; every row applied exactly as the frame alone would be, bad rows refused alone."""

from __future__ import annotations

import asyncio
import signal
import threading

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.server_process import ServerProcess
from tests.streaming import (
    FEATURES,
    RawStream,
    assert_matches_references,
    frame_request,
    sequence,
    x_tensor,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def group_request(
    request_id: int,
    model: str,
    ids: list[str],
    indices: list[int],
    rows: npt.NDArray[np.float32],
) -> pb.StreamRequest:
    """`rows` [K, T, F]: row k is session ids[k]'s frame; sent as x [T, K, F]."""
    x = np.ascontiguousarray(rows.transpose(1, 0, 2))
    group = pb.FrameGroup(
        request_id=request_id,
        model=model,
        session_ids=ids,
        frame_indices=indices,
        inputs=[encode(x, "x")],
    )
    return pb.StreamRequest(frame_group=group)


async def answer(stream: RawStream, request: pb.StreamRequest) -> pb.GroupOutputs:
    response = await stream.request(request)
    assert response.WhichOneof("kind") == "group_outputs", response
    assert response.group_outputs.request_id == request.frame_group.request_id
    return response.group_outputs


def rows_of(outputs: pb.GroupOutputs) -> npt.NDArray[np.float32]:
    """y [T, K, H] as [K, T, H]."""
    (tensor,) = outputs.outputs
    assert tensor.name == "y"
    return np.asarray(decode(tensor)).transpose(1, 0, 2)


def errors_by_session(outputs: pb.GroupOutputs) -> dict[str, pb.StreamError]:
    return {e.session_id: e for e in outputs.errors}


async def test_group_outputs_equal_the_references(server: RunningServer) -> None:
    async with RawStream(server.target) as stream:
        for model in ("gru", "lstm"):
            ids = [(await stream.open(model)).session_id for _ in range(6)]
            xs = [sequence(model, 7, seed=k) for k in range(6)]
            got: list[list[npt.NDArray[np.float32]]] = [[] for _ in ids]
            # Five one-step groups, then one of two steps: all sessions' frames of one message.
            for t, steps in ((0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 2)):
                rows = np.stack([x[t : t + steps] for x in xs])
                outputs = await answer(stream, group_request(t, model, ids, [t] * 6, rows))
                assert not outputs.errors
                for k, y in enumerate(rows_of(outputs)):
                    got[k].extend(y)
            for k, x in enumerate(xs):
                assert_matches_references(model, x, np.stack(got[k]))


async def test_bad_rows_are_refused_alone(server: RunningServer) -> None:
    async with RawStream(server.target) as stream:
        good, late, nan, dup = [(await stream.open("gru")).session_id for _ in range(4)]
        other = (await stream.open("lstm")).session_id
        ids = [good, "nobody", late, nan, other, dup, dup]
        rows = np.stack([sequence("gru", 1, seed=k) for k in range(len(ids))])
        rows[3, 0, 5] = np.nan
        indices = [0, 0, 3, 0, 0, 0, 0]  # `late` sends frame 3 first: out of order
        outputs = await answer(stream, group_request(1, "gru", ids, indices, rows))
        errors = errors_by_session(outputs)
        assert set(errors) == {"nobody", late, nan, other, dup}
        assert errors["nobody"].code == NOT_FOUND
        assert errors[late].code == FAILED_PRECONDITION and errors[late].frame_index == 3
        assert errors[nan].code == INVALID and "NaN" in errors[nan].message
        assert errors[other].code == INVALID and "lstm" in errors[other].message
        assert errors[dup].code == INVALID and "twice" in errors[dup].message
        y = rows_of(outputs)
        assert_matches_references("gru", rows[0], y[0])
        assert not y[1].any()  # a failed row holds zeros
        # The refused rows changed nothing: their sessions still expect frame 0 (dup's first
        # row was applied: it expects 1) and answer it from the initial state.
        x = sequence("gru", 1, seed=11)
        for session_id in (late, nan):
            assert_matches_references("gru", x, await stream.frame(session_id, 0, x))
        assert server.run(lambda: probe.next_indices(server.engine)[dup]) == 1


async def test_a_resent_group_is_answered_from_the_ring(server: RunningServer) -> None:
    async with RawStream(server.target) as stream:
        ids = [(await stream.open("gru")).session_id for _ in range(3)]
        xs = [sequence("gru", 3, seed=20 + k) for k in range(3)]
        first = await answer(stream, group_request(1, "gru", ids, [0] * 3, np.stack(xs)[:, :1]))
        again = await answer(stream, group_request(2, "gru", ids, [0] * 3, np.stack(xs)[:, :1]))
        assert not again.errors
        np.testing.assert_array_equal(rows_of(again), rows_of(first))
        # Other inputs under an applied index are not a resend: refused, nothing changes.
        other = await answer(stream, group_request(3, "gru", ids[:1], [0], np.stack(xs)[:1, 1:2]))
        if other.errors:  # servers that keep a digest of each frame's inputs refuse it
            assert other.errors[0].code == FAILED_PRECONDITION
        rest = await answer(stream, group_request(4, "gru", ids, [1] * 3, np.stack(xs)[:, 1:]))
        for k, x in enumerate(xs):
            y = np.concatenate([rows_of(first)[k], rows_of(rest)[k]])
            assert_matches_references("gru", x, y)
        assert server.run(lambda: probe.next_indices(server.engine)[ids[0]]) == 2  # two frames


async def test_groups_and_single_frames_keep_each_sessions_order(server: RunningServer) -> None:
    """Messages sent back to back without waiting: a single frame, a group that continues that
    session and starts another, then a single frame again. Each session's frames apply in
    index order whichever way they came."""
    async with RawStream(server.target) as stream:
        a, b = [(await stream.open("gru")).session_id for _ in range(2)]
        xa, xb = sequence("gru", 3, seed=31), sequence("gru", 2, seed=32)
        await stream.call.write(frame_request(a, 0, x_tensor(xa[:1])))
        await stream.call.write(
            group_request(9, "gru", [a, b], [1, 0], np.stack([xa[1:2], xb[:1]]))
        )
        await stream.call.write(frame_request(a, 2, x_tensor(xa[2:])))
        await stream.call.write(frame_request(b, 1, x_tensor(xb[1:])))
        ya: dict[int, npt.NDArray[np.float32]] = {}
        yb: dict[int, npt.NDArray[np.float32]] = {}
        while len(ya) + len(yb) < 5:
            response = await asyncio.wait_for(stream.call.read(), 10)
            assert isinstance(response, pb.StreamResponse)
            kind = response.WhichOneof("kind")
            if kind == "output":
                out = response.output
                (ya if out.session_id == a else yb)[out.frame_index] = decode(out.outputs[0])
            else:
                assert kind == "group_outputs", response
                assert not response.group_outputs.errors
                rows = rows_of(response.group_outputs)
                ya[1], yb[0] = rows[0], rows[1]
        assert_matches_references("gru", xa, np.concatenate([ya[i] for i in range(3)]))
        assert_matches_references("gru", xb, np.concatenate([yb[i] for i in range(2)]))


async def test_a_group_larger_than_a_batch_is_split(make_server) -> None:
    running: RunningServer = make_server(models=("gru",), max_batch_size=4)
    async with RawStream(running.target) as stream:
        ids = [(await stream.open("gru")).session_id for _ in range(10)]
        xs = np.stack([sequence("gru", 2, seed=40 + k) for k in range(10)])
        y0 = rows_of(await answer(stream, group_request(1, "gru", ids, [0] * 10, xs[:, :1])))
        y1 = rows_of(await answer(stream, group_request(2, "gru", ids, [1] * 10, xs[:, 1:])))
        for k in range(10):
            assert_matches_references("gru", xs[k], np.concatenate([y0[k], y1[k]]))
    sizes = running.run(lambda: running.engine.model_stats("gru").by_size)
    assert max(sizes) == 4 and sum(n * size for size, (n, _) in sizes.items()) == 20


async def test_a_group_refused_as_a_whole_answers_every_row(server: RunningServer) -> None:
    async with RawStream(server.target) as stream:
        ids = [(await stream.open("gru")).session_id for _ in range(3)]
        x = np.zeros((1, 3, FEATURES["gru"]), np.float32)
        cases = {
            # K on the wrong axis: [3, 1, 16] is three time steps of one session.
            "batch axis": pb.FrameGroup(
                model="gru",
                session_ids=ids,
                frame_indices=[0] * 3,
                inputs=[encode(x.transpose(1, 0, 2), "x")],
            ),
            "unknown model": pb.FrameGroup(
                model="nope", session_ids=ids, frame_indices=[0] * 3, inputs=[encode(x, "x")]
            ),
            "3 sessions but 2 frame indices": pb.FrameGroup(
                model="gru", session_ids=ids, frame_indices=[0] * 2, inputs=[encode(x, "x")]
            ),
            "bytes": pb.FrameGroup(
                model="gru",
                session_ids=ids,
                frame_indices=[0] * 3,
                inputs=[pb.Tensor(name="x", dtype=pb.FLOAT32, shape=[1, 3, 16], data=b"\0" * 7)],
            ),
            "no tensors": pb.FrameGroup(model="gru", session_ids=ids, frame_indices=[0] * 3),
        }
        for number, (words, group) in enumerate(cases.items()):
            group.request_id = 100 + number
            outputs = await answer(stream, pb.StreamRequest(frame_group=group))
            assert [e.session_id for e in outputs.errors] == ids, words
            assert not outputs.outputs
            for error in outputs.errors:
                assert error.code in (INVALID, NOT_FOUND), error
                assert words.split()[-1] in error.message, (words, error.message)
        empty = await answer(stream, pb.StreamRequest(frame_group=pb.FrameGroup(model="gru")))
        assert not empty.errors and not empty.outputs  # no rows: nothing to answer but the id
        # Nothing was applied: every session still expects frame 0.
        assert [server.run(lambda s=s: probe.next_indices(server.engine)[s]) for s in ids] == [
            0
        ] * 3


async def test_rows_behind_a_busy_session_wait_in_its_queue(make_server) -> None:
    """A row whose session has a frame queued or running goes into that session's queue and
    runs after it; the group is answered once its last row is done."""
    server: RunningServer = make_server(models=("gru",))  # ORT runs in its thread
    async with RawStream(server.target) as stream:
        a, b = [(await stream.open("gru")).session_id for _ in range(2)]
        xa, xb = sequence("gru", 2, seed=51), sequence("gru", 1, seed=52)
        release = threading.Event()
        probe.block_ort(server.engine, release)
        try:
            await stream.call.write(frame_request(a, 0, x_tensor(xa[:1])))
            await stream.call.write(group_request(5, "gru", [a, b], [1, 0], np.stack([xa[1:], xb])))
            while (
                server.run(lambda: probe.session(server.engine, "anonymous", a).frames_queued) < 1
            ):
                await asyncio.sleep(0.01)
        finally:
            release.set()
        first = await asyncio.wait_for(stream.call.read(), 10)
        second = await asyncio.wait_for(stream.call.read(), 10)
    assert isinstance(first, pb.StreamResponse) and first.WhichOneof("kind") == "output"
    assert isinstance(second, pb.StreamResponse) and second.WhichOneof("kind") == "group_outputs"
    y = rows_of(second.group_outputs)
    assert_matches_references("gru", xa, np.concatenate([decode(first.output.outputs[0]), y[0]]))
    assert_matches_references("gru", xb, y[1])


async def test_a_group_during_shutdown_is_refused_row_by_row(make_server) -> None:
    running: RunningServer = make_server(models=("gru",))
    async with RawStream(running.target) as stream:
        ids = [(await stream.open("gru")).session_id for _ in range(2)]
        running.run(running.engine.stop_accepting)
        rows = np.stack([sequence("gru", 1, seed=k) for k in range(2)])
        outputs = await answer(stream, group_request(1, "gru", ids, [0, 0], rows))
    assert [e.code for e in outputs.errors] == [UNAVAILABLE] * 2


async def test_rows_of_emit_last_sessions_are_applied_silently(server: RunningServer) -> None:
    """An EMIT_LAST session's row is applied and answered with zeros; a flush gives its output."""
    async with RawStream(server.target) as stream:
        every = (await stream.open("gru")).session_id
        response = await stream.request(
            pb.StreamRequest(open=pb.OpenSession(model="gru", emit=pb.EMIT_LAST))
        )
        last = response.opened.session_id
        rows = np.stack([sequence("gru", 1, seed=k) for k in (81, 82)])
        outputs = await answer(stream, group_request(1, "gru", [every, last], [0, 0], rows))
        assert not outputs.errors
        y = rows_of(outputs)
        assert_matches_references("gru", rows[0], y[0])
        assert not y[1].any()
        flushed = await stream.request(pb.StreamRequest(flush=pb.FlushSession(session_id=last)))
        assert flushed.flushed.frame_index == 0
        assert_matches_references("gru", rows[1], decode(flushed.flushed.outputs[0]))


async def test_every_group_read_is_answered_when_the_server_stops() -> None:
    """SIGTERM with --grace 0 while groups wait in the ready queue (each a block for its own
    sessions, T = 1024 so each batch takes a while): every group read gets its GroupOutputs,
    each row run or refused with UNAVAILABLE, before the shutdown notice ends the stream."""
    groups, rows, steps = 12, 4, 1024
    server = ServerProcess("--models", "gru", "--grace", "0", "--max-batch-size", str(rows))
    try:
        async with RawStream(server.target) as stream:
            ids = [
                [(await stream.open("gru")).session_id for _ in range(rows)] for _ in range(groups)
            ]
            x = np.stack([sequence("gru", steps, seed=k) for k in range(rows)])
            for g in range(groups):
                await stream.call.write(group_request(g, "gru", ids[g], [0] * rows, x))
            # Frame 1 of the last group's sessions queues behind their block (in flight): once
            # the server holds it, it has read every group before it.
            await stream.call.write(group_request(groups, "gru", ids[-1], [1] * rows, x[:, :1]))
            info = pb.GetSessionRequest(session_id=ids[-1][0])
            while (await stream.stub.GetSession(info)).pending_frames == 0:
                await asyncio.sleep(0.005)
            server.signal(signal.SIGTERM)
            answered: dict[int, pb.GroupOutputs] = {}
            notice = None
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    response = await asyncio.wait_for(stream.call.read(), 30)
                    assert response is not grpc.aio.EOF
                    kind = response.WhichOneof("kind")
                    if kind == "group_outputs":
                        assert notice is None
                        answered[response.group_outputs.request_id] = response.group_outputs
                    else:
                        assert kind == "notice", response
                        notice = response.notice
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert notice is not None and sorted(answered) == list(range(groups + 1))
        refused = [g for g, a in answered.items() if a.errors]
        for g in refused:
            assert [e.code for e in answered[g].errors] == [UNAVAILABLE] * rows
        assert refused, "the server ran every group within a grace of 0"
    finally:
        server.close()


async def test_a_group_whose_answer_would_not_fit_is_refused(make_server) -> None:
    running: RunningServer = make_server(models=("gru",), max_message_bytes=65536)
    async with RawStream(running.target) as stream:
        ids = [(await stream.open("gru")).session_id for _ in range(130)]
        rows = np.zeros((130, 1, FEATURES["gru"]), np.float32)  # 130 x 512 bytes out: too many
        outputs = await answer(stream, group_request(1, "gru", ids, [0] * 130, rows))
        assert {e.code for e in outputs.errors} == {INVALID}
        assert "fewer sessions" in outputs.errors[0].message
        fits = await answer(stream, group_request(2, "gru", ids[:64], [0] * 64, rows[:64]))
        assert not fits.errors
