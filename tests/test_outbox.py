"""Outbox on its own: what gets packed into FrameOutputs, in what order, and under what size."""

from __future__ import annotations

import asyncio

import numpy as np

from rnnstream.proto.tensor_codec import encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.transport.grpc._outbox import Outbox


def _output(session: str, index: int, values: int = 4) -> pb.StreamResponse:
    tensor = encode(np.full((1, values), index, np.float32), "y")
    return pb.StreamResponse(
        output=pb.FrameOutput(session_id=session, frame_index=index, outputs=[tensor])
    )


def _error(session: str, index: int) -> pb.StreamResponse:
    return pb.StreamResponse(
        error=pb.StreamError(code=9, message="out of order", session_id=session, frame_index=index)
    )


def _drain(outbox: Outbox) -> list[object]:
    taken = []
    while not outbox.empty():
        taken.append(outbox.get_nowait())
    return taken


def _frames(item: object) -> list[tuple[str, int]]:
    assert isinstance(item, pb.StreamResponse)
    outputs = item.outputs.outputs if item.HasField("outputs") else [item.output]
    return [(o.session_id, o.frame_index) for o in outputs]


def test_outputs_queued_back_to_back_leave_as_one_message_in_order() -> None:
    outbox = Outbox(pack_limit_bytes=1 << 20)
    sent = [_output(f"s{k % 3}", k // 3) for k in range(9)]
    for item in sent:
        outbox.put_nowait(item)
    (packed,) = _drain(outbox)
    assert isinstance(packed, pb.StreamResponse) and packed.WhichOneof("kind") == "outputs"
    assert _frames(packed) == [f for item in sent for f in _frames(item)]
    assert list(packed.outputs.outputs) == [item.output for item in sent]


def test_anything_else_ends_a_pack_and_keeps_its_place() -> None:
    outbox = Outbox(pack_limit_bytes=1 << 20)
    items: list[object] = [_output("a", 0), _output("b", 0), _error("c", 3), _output("a", 1)]
    items += [None]  # the writer's end-of-call sentinel
    for item in items:
        outbox.put_nowait(item)
    taken = _drain(outbox)
    assert [_frames(t) for t in taken[:1]] == [[("a", 0), ("b", 0)]]
    assert taken[1] is items[2]
    assert taken[2] is items[3]  # a lone output stays a plain `output` message
    assert taken[3] is None


def test_a_pack_stays_under_the_limit() -> None:
    one = _output("a", 1, values=64).ByteSize()  # the same for indices 1 to 8
    limit = 3 * one + 16  # room for three outputs and the wrapper
    outbox = Outbox(pack_limit_bytes=limit)
    for index in range(1, 9):
        outbox.put_nowait(_output("a", index, values=64))
    taken = _drain(outbox)
    assert [len(_frames(t)) for t in taken] == [3, 3, 2]
    assert all(isinstance(t, pb.StreamResponse) and t.ByteSize() <= limit for t in taken)
    assert [f for t in taken for f in _frames(t)] == [("a", i) for i in range(1, 9)]


def test_without_a_limit_nothing_is_packed() -> None:
    outbox = Outbox()
    sent = [_output("a", i) for i in range(4)]
    for item in sent:
        outbox.put_nowait(item)
    assert _drain(outbox) == sent


async def test_get_waits_for_the_next_item() -> None:
    outbox = Outbox(pack_limit_bytes=1 << 20)
    getter = asyncio.ensure_future(outbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    first, second = _output("a", 0), _output("b", 0)
    outbox.put_nowait(first)
    outbox.put_nowait(second)
    packed = await asyncio.wait_for(getter, 1)
    assert _frames(packed) == [("a", 0), ("b", 0)]
    assert outbox.empty()


async def test_a_reader_waits_for_room_until_the_writer_sends() -> None:
    outbox = Outbox()
    for index in range(3):
        outbox.put_nowait(_output("a", index))
    reader = asyncio.ensure_future(outbox.wait_for_room(3))
    await asyncio.sleep(0)
    assert not reader.done()  # three waiting: no room under a limit of three
    outbox.get_nowait()
    outbox.wrote()
    await asyncio.wait_for(reader, 1)
    await asyncio.wait_for(outbox.wait_for_room(3), 1)  # room already: no wait
