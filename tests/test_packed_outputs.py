"""FrameOutputs: outputs answered together travel in one message, only on streams that ask for it;
in order, equal to the references, split at the message limit; the server can turn it off."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from rnnstream import AsyncClient
from rnnstream.proto.metadata import PACK_OUTPUTS_METADATA_KEY
from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.streaming import (
    RawStream,
    assert_matches_references,
    frame_request,
    sequence,
    x_tensor,
)

MODEL = "gru"
PACK = ((PACK_OUTPUTS_METADATA_KEY, "1"),)
SESSIONS = 16


async def _one_batch_of_answers(
    running: RunningServer, stream: RawStream
) -> tuple[list[pb.StreamResponse], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Open SESSIONS sessions, hold the ORT thread while each sends frame 0, then let it go: the
    frames run in at most two batches. Returns the messages that answer them, and each session's
    input and output."""
    ids = [(await stream.open(MODEL)).session_id for _ in range(SESSIONS)]
    inputs = {sid: sequence(MODEL, 1, seed=k) for k, sid in enumerate(ids)}
    release = threading.Event()
    probe.block_ort(running.engine, release)
    try:
        for sid in ids:
            await stream.call.write(frame_request(sid, 0, x_tensor(inputs[sid])))

        def waiting() -> int:
            sessions = [probe.session(running.engine, "anonymous", sid) for sid in ids]
            return sum(s.frames_queued + s.in_flight for s in sessions)

        while running.run(waiting) < SESSIONS:
            await asyncio.sleep(0.01)
    finally:
        release.set()
    messages: list[pb.StreamResponse] = []
    outputs: dict[str, np.ndarray] = {}
    while len(outputs) < SESSIONS:
        response = await asyncio.wait_for(stream.call.read(), 10)
        assert isinstance(response, pb.StreamResponse)
        messages.append(response)
        kind = response.WhichOneof("kind")
        assert kind in ("output", "outputs"), response
        for output in response.outputs.outputs if kind == "outputs" else [response.output]:
            assert output.frame_index == 0 and output.session_id not in outputs
            (tensor,) = output.outputs
            outputs[output.session_id] = np.array(decode(tensor))
    return messages, inputs, outputs


def _server(make_server: Callable[..., RunningServer], **overrides: object) -> RunningServer:
    # Batches go to the executor thread (no runs on the event loop), which the test holds.
    return make_server(models=(MODEL,), **overrides)


async def test_a_batch_is_answered_in_one_message_when_the_stream_asks(
    make_server: Callable[..., RunningServer],
) -> None:
    running = _server(make_server)
    async with RawStream(running.target, PACK) as stream:
        messages, inputs, outputs = await _one_batch_of_answers(running, stream)
    # The first batch may hold only the frames that came before the thread was found busy;
    # however the frames were split, each batch's outputs came in one message.
    by_size = running.run(lambda: running.engine.model_stats(MODEL).by_size)
    batches = sorted(size for size, (count, _) in by_size.items() for _ in range(int(count)))
    sizes = sorted(len(m.outputs.outputs) if m.HasField("outputs") else 1 for m in messages)
    assert sizes == batches and len(batches) <= 2 and sum(batches) == SESSIONS
    assert any(m.HasField("outputs") for m in messages)
    for sid, x in inputs.items():
        assert_matches_references(MODEL, x, outputs[sid])


async def test_streams_that_do_not_ask_get_one_message_per_frame(
    make_server: Callable[..., RunningServer],
) -> None:
    running = _server(make_server)
    async with RawStream(running.target) as stream:
        messages, inputs, outputs = await _one_batch_of_answers(running, stream)
    assert [m.WhichOneof("kind") for m in messages] == ["output"] * SESSIONS
    for sid, x in inputs.items():
        assert_matches_references(MODEL, x, outputs[sid])


async def test_the_server_can_turn_packing_off(
    make_server: Callable[..., RunningServer],
) -> None:
    running = _server(make_server, pack_outputs=False)
    async with RawStream(running.target, PACK) as stream:
        messages, _, _ = await _one_batch_of_answers(running, stream)
    assert [m.WhichOneof("kind") for m in messages] == ["output"] * SESSIONS


async def test_packed_messages_stay_under_the_message_limit(
    make_server: Callable[..., RunningServer],
) -> None:
    limit = 4096  # a gru output (128 float32) is ~560 bytes as a FrameOutput: ~7 per message
    running = _server(make_server, max_message_bytes=limit)
    async with RawStream(running.target, PACK) as stream:
        messages, inputs, outputs = await _one_batch_of_answers(running, stream)
    assert len(messages) >= 3
    assert all(m.ByteSize() <= limit for m in messages)
    assert any(m.WhichOneof("kind") == "outputs" for m in messages)
    for sid, x in inputs.items():
        assert_matches_references(MODEL, x, outputs[sid])


@pytest.mark.parametrize("pack_outputs", [True, False])
async def test_the_client_steps_sessions_the_same_either_way(
    make_server: Callable[..., RunningServer], pack_outputs: bool
) -> None:
    running = make_server(models=(MODEL,))
    x = {k: sequence(MODEL, 12, seed=100 + k) for k in range(24)}
    async with AsyncClient(running.target, pack_outputs=pack_outputs) as client:
        sessions = [await client.open(MODEL) for _ in x]

        async def drive(k: int) -> np.ndarray:
            return np.stack([(await sessions[k].step(row))["y"] for row in x[k]])

        ys = await asyncio.gather(*(drive(k) for k in x))
    for k, y in enumerate(ys):
        assert_matches_references(MODEL, x[k], y)
