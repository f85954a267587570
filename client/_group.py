"""Frames of many sessions in one message (FrameGroup), and what waits for each row's answer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import grpc
import numpy as np

from rnnstream._errors import FrameGroupError, RnnstreamError
from rnnstream._frames import (
    Array,
    FrameInput,
    NamedArrays,
    Outputs,
    decode_tensors,
    stack_frames,
)
from rnnstream._info import ModelInfo
from rnnstream.proto.tensor_codec import encode, encode_into
from rnnstream.proto.v1 import rnnstream_pb2 as pb

if TYPE_CHECKING:
    from rnnstream._session import AsyncSession

__all__ = [
    "GroupCall",
    "GroupRow",
    "PendingFrame",
    "RowEntry",
    "Settles",
    "group_result",
    "pack_frames",
    "stack_rows",
    "step_many",
]


class RowEntry(Protocol):
    """A frame sent and not yet answered, as its session's waiters keep it."""

    index: int

    @property
    def squeeze(self) -> bool:
        """Outputs lose a time axis of length 1 (the frame was a step given without one)."""
        ...

    def request(self) -> pb.StreamRequest:
        """The frame alone, to resend after a reconnect."""
        ...

    def resolve(self, outputs: Outputs) -> None: ...

    def fail(self, error: RnnstreamError) -> None: ...


class PendingFrame:
    """One session's frame (sent alone, or packed with others' into a FrameGroup)."""

    __slots__ = ("_request", "arrays", "future", "index", "session_id", "squeeze")

    def __init__(
        self,
        session_id: str,
        index: int,
        arrays: NamedArrays,
        squeeze: bool,
        future: asyncio.Future[Outputs],
    ) -> None:
        self.session_id = session_id
        self.index = index
        self.arrays = arrays
        self.squeeze = squeeze
        self.future = future
        self._request: pb.StreamRequest | None = None

    def request(self) -> pb.StreamRequest:
        if self._request is None:
            frame = pb.Frame(session_id=self.session_id, frame_index=self.index)
            for name, array in self.arrays:
                encode_into(frame.inputs.add(), array, name)
            self._request = pb.StreamRequest(frame=frame)
        return self._request

    def resolve(self, outputs: Outputs) -> None:
        if not self.future.done():
            self.future.set_result(outputs)

    def fail(self, error: RnnstreamError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Settles(Protocol):
    """A session's waiters, as a group's answer settles them."""

    def settle(self, index: int) -> RowEntry | None:
        """The frame's answer came: it no longer waits; its entry (None if none waits)."""
        ...


class GroupRow:
    """A row of an explicit frame group (step_many): answered into its group."""

    __slots__ = ("group", "index", "row")

    def __init__(self, group: GroupCall, row: int, index: int) -> None:
        self.group = group
        self.row = row
        self.index = index

    @property
    def squeeze(self) -> bool:
        return self.group.squeeze

    def request(self) -> pb.StreamRequest:
        return self.group.row_request(self.row)

    def resolve(self, outputs: Outputs) -> None:
        self.group.row_done(self.row, outputs)

    def fail(self, error: RnnstreamError) -> None:
        self.group.row_done(self.row, error)


class GroupCall:
    """One FrameGroup: K sessions' frames stacked on each input's batch axis. Its rows are
    answered by one GroupOutputs, or, after a reconnect (when they are resent one by one), by
    single outputs; `done` resolves once every row is answered."""

    def __init__(
        self,
        model: ModelInfo,
        session_ids: list[str],
        indices: list[int],
        inputs: NamedArrays,
        squeeze: bool,
    ) -> None:
        self.model = model
        self.session_ids = session_ids
        self.indices = indices
        self.inputs = inputs  # stacked, K on each input's batch axis
        self.squeeze = squeeze
        self.waiters: list[Settles] = []  # each row's session's, set by whoever sends it
        self.request_id = 0
        self._results: list[Outputs | RnnstreamError | None] = [None] * len(session_ids)
        self._left = len(session_ids)
        self.done: asyncio.Future[list[Outputs | RnnstreamError | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._axes = {t.name: t.batch_axis for t in model.inputs}
        self._out_infos = {t.name: t for t in model.outputs}

    def __len__(self) -> int:
        return len(self.session_ids)

    def request(self) -> pb.StreamRequest:
        group = pb.FrameGroup(
            request_id=self.request_id,
            model=self.model.name,
            session_ids=self.session_ids,
            frame_indices=self.indices,
        )
        for name, array in self.inputs:
            encode_into(group.inputs.add(), array, name)
        return pb.StreamRequest(frame_group=group)

    def row_request(self, row: int) -> pb.StreamRequest:
        frame = pb.Frame(session_id=self.session_ids[row], frame_index=self.indices[row])
        for name, array in self.inputs:
            axis = self._axes.get(name) or 0
            frame.inputs.append(encode(np.take(array, row, axis=axis), name))
        return pb.StreamRequest(frame=frame)

    def row_done(self, row: int, result: Outputs | RnnstreamError) -> None:
        if self._results[row] is not None:
            return
        self._results[row] = result
        self._left -= 1
        if not self._left and not self.done.done():
            self.done.set_result(self._results)

    def row_of(self, session_id: str) -> int | None:
        try:
            return self.session_ids.index(session_id)
        except ValueError:
            return None

    def answered(self, message: pb.GroupOutputs, failed: set[int]) -> None:
        """The group's answer: every row not in `failed` (whose errors were routed to their
        sessions already) gets its outputs, views of the message's arrays."""
        columns: list[tuple[str, list[Array]]] = []
        for name, array in decode_tensors(message.outputs).items():
            info = self._out_infos.get(name)
            axis = info.batch_axis if info is not None and info.batch_axis is not None else 0
            time = info.time_axis if info is not None else None
            if self.squeeze and time is not None and array.shape[time] == 1:
                array = np.squeeze(array, time)  # steps given without a time axis
                axis -= time < axis
            columns.append((name, list(np.moveaxis(array, axis, 0))))  # one view per row
        single = columns[0] if len(columns) == 1 else None
        for row, (waiters, index) in enumerate(zip(self.waiters, self.indices, strict=True)):
            if row in failed:
                continue
            entry = waiters.settle(index)
            if entry is None:  # answered already (a resend) or given up
                continue
            if single is not None:
                entry.resolve({single[0]: single[1][row]})
            else:
                entry.resolve({name: rows[row] for name, rows in columns})


Queued = tuple[ModelInfo, PendingFrame, Settles]


def pack_frames(frames: Sequence[Queued]) -> list[pb.StreamRequest | GroupCall]:
    """Frames queued together, as messages: a frame alone, or a GroupCall of several sessions'
    frames of one model (at most one per session: a session's later frame goes into a later
    message), each session's frames in the order they were queued."""
    messages: list[tuple[ModelInfo, list[Queued]]] = []
    after: dict[str, int] = {}  # session -> the message after its latest one: its next goes there
    for queued in frames:
        model, frame, _ = queued
        session = frame.session_id
        start = after.get(session, 0)
        for number in range(start, len(messages)):
            other, members = messages[number]
            if other.name == model.name and _same_layout(members[0][1], frame):
                members.append(queued)
                after[session] = number + 1
                break
        else:
            messages.append((model, [queued]))
            after[session] = len(messages)
    out: list[pb.StreamRequest | GroupCall] = []
    for model, members in messages:
        if len(members) == 1:
            out.append(members[0][1].request())
            continue
        group = GroupCall(
            model,
            [f.session_id for _, f, _ in members],
            [f.index for _, f, _ in members],
            stack_rows(model, [f.arrays for _, f, _ in members]),
            members[0][1].squeeze,
        )
        group.waiters = [w for _, _, w in members]
        out.append(group)
    return out


def _same_layout(a: PendingFrame, b: PendingFrame) -> bool:
    """Frames stack into one group only with the same inputs, shapes and dtypes."""
    return a.squeeze == b.squeeze and _same_arrays(a.arrays, b.arrays)


def stack_rows(model: ModelInfo, rows: Sequence[NamedArrays]) -> NamedArrays:
    """Each input's frames stacked on the input's batch axis (K rows)."""
    axes = {t.name: t.batch_axis for t in model.inputs}
    stacked: NamedArrays = []
    for i, (name, _) in enumerate(rows[0]):
        axis = axes.get(name) or 0
        stacked.append((name, np.stack([row[i][1] for row in rows], axis=axis)))
    return stacked


def group_result(
    sessions: Sequence[AsyncSession], results: Sequence[Outputs | RnnstreamError | None]
) -> dict[AsyncSession, Outputs]:
    """step_many's answer: outputs by session, or FrameGroupError when a row failed."""
    outputs: dict[AsyncSession, Outputs] = {}
    errors: dict[AsyncSession, RnnstreamError] = {}
    for session, result in zip(sessions, results, strict=True):
        if isinstance(result, RnnstreamError):
            errors[session] = result
        elif result is None:  # cannot happen once done: every row is answered
            errors[session] = RnnstreamError(grpc.StatusCode.INTERNAL, "row not answered")
        else:
            outputs[session] = result
    if errors:
        raise FrameGroupError(outputs, errors)
    return outputs


async def step_many(frames: Mapping[AsyncSession, FrameInput]) -> dict[AsyncSession, Outputs]:
    """One frame for each session: one FrameGroup per stream and model, answered together.
    Raises FrameGroupError (holding the others' outputs) when some of them failed."""
    by_stream: dict[tuple[int, str], list[tuple[AsyncSession, FrameInput]]] = {}
    for session, frame in frames.items():
        by_stream.setdefault((id(session._mux), session.model.name), []).append((session, frame))
    groups: list[tuple[list[AsyncSession], GroupCall]] = []
    for rows in by_stream.values():
        sessions = [session for session, _ in rows]
        model = sessions[0].model
        axes = {t.name: t.batch_axis or 0 for t in model.inputs}
        inputs, squeeze = stack_frames(model, [frame for _, frame in rows], axes)
        groups.append((sessions, GroupCall(model, [s.id for s in sessions], [], inputs, squeeze)))
    taken: list[AsyncSession] = []
    try:
        for sessions, group in groups:
            for session in sessions:
                group.indices.append(session._group_index())
                taken.append(session)
    except BaseException:
        for session in taken:  # nothing was sent: give the indices back
            session.next_index -= 1
        raise
    for sessions, group in groups:
        await sessions[0]._send_group(group, sessions)
    answered: dict[AsyncSession, Outputs | RnnstreamError | None] = {}
    for sessions, group in groups:
        for session, result in zip(sessions, await group.done, strict=True):
            answered[session] = result
    return group_result(list(answered), list(answered.values()))


def _same_arrays(a: NamedArrays, b: NamedArrays) -> bool:
    return len(a) == len(b) and all(
        n1 == n2 and x.shape == y.shape and x.dtype == y.dtype
        for (n1, x), (n2, y) in zip(a, b, strict=True)
    )
