"""Frames of many sessions in one message (FrameGroup), and what waits for each row's answer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from rnnstream._errors import FrameGroupError, RnnstreamError
from rnnstream._frames import (
    Array,
    FrameInput,
    NamedArrays,
    Outputs,
    decode_tensors,
    stack_frames,
    stacked_arrays,
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
    "pack_frames",
    "stack_rows",
    "step_many",
    "step_stacked",
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
        explicit: bool = False,
    ) -> None:
        self.model = model
        self.session_ids = session_ids
        self.indices = indices
        self.inputs = inputs  # stacked, K on each input's batch axis
        self.squeeze = squeeze
        # Explicit (step_many, step_stacked): its rows wait in the group, which keeps the answer
        # whole (`whole`, K first on each output); else each row's own waiter is answered.
        self.explicit = explicit
        self.waiters: list[Settles] = []  # each row's session's, set by whoever sends it
        self.request_id = 0
        self.results: list[Outputs | RnnstreamError | None] = [None] * len(session_ids)
        self.whole: Outputs | None = None
        self._left = len(session_ids)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
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
        if self.results[row] is not None:
            return
        self.results[row] = result
        self._left -= 1
        if not self._left and not self.done.done():
            self.done.set_result(None)

    def row_of(self, session_id: str) -> int | None:
        try:
            return self.session_ids.index(session_id)
        except ValueError:
            return None

    def answered(self, message: pb.GroupOutputs, failed: set[int]) -> None:
        """The group's answer: every row not in `failed` (whose errors were routed to their
        sessions already) gets its outputs, views of the message's arrays."""
        whole: Outputs = {}
        for name, array in decode_tensors(message.outputs).items():
            info = self._out_infos.get(name)
            axis = info.batch_axis if info is not None and info.batch_axis is not None else 0
            time = info.time_axis if info is not None else None
            if self.squeeze and time is not None and array.shape[time] == 1:
                array = np.squeeze(array, time)  # steps given without a time axis
                axis -= time < axis
            whole[name] = np.moveaxis(array, axis, 0)  # K first
        if self.explicit:
            self.whole = whole
            for row, (waiters, index) in enumerate(zip(self.waiters, self.indices, strict=True)):
                if row not in failed and waiters.settle(index) is not None:
                    self.row_done(row, whole)  # its row of the whole answer
            return
        columns = [(name, list(array)) for name, array in whole.items()]  # one view per row
        for row, (waiters, index) in enumerate(zip(self.waiters, self.indices, strict=True)):
            if row in failed:
                continue
            entry = waiters.settle(index)
            if entry is not None:  # else answered already (a resend) or given up
                entry.resolve({name: rows[row] for name, rows in columns})

    def stacked(self) -> tuple[Outputs, dict[int, RnnstreamError]]:
        """Once done: each output with the K rows first (a failed row holds zeros), and the
        failed rows' errors."""
        errors = {r: e for r, e in enumerate(self.results) if isinstance(e, RnnstreamError)}
        rows = [r for r in self.results if isinstance(r, dict)]
        if self.whole is not None and all(r is self.whole for r in rows):
            return self.whole, errors
        if not rows:
            return {}, errors
        template = rows[0] if rows[0] is not self.whole else _row_of(self.whole, 0)
        out: Outputs = {}
        for name, first in template.items():
            out[name] = np.stack([self._row(r, name, first) for r in range(len(self.results))])
        return out, errors

    def _row(self, row: int, name: str, like: Array) -> Array:
        result = self.results[row]
        if not isinstance(result, dict):
            return np.zeros_like(like)
        return result[name][row] if result is self.whole else result[name]

    def per_session(self) -> tuple[list[Outputs | None], dict[int, RnnstreamError]]:
        """Once done: each row's outputs (None where it failed) and the failed rows' errors."""
        errors = {r: e for r, e in enumerate(self.results) if isinstance(e, RnnstreamError)}
        rows: list[Outputs | None] = []
        for row, result in enumerate(self.results):
            if not isinstance(result, dict):
                rows.append(None)
            elif result is self.whole:
                rows.append({name: array[row] for name, array in result.items()})
            else:
                rows.append(result)
        return rows, errors


def _row_of(outputs: Outputs, row: int) -> Outputs:
    return {name: array[row] for name, array in outputs.items()}


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


async def step_many(frames: Mapping[AsyncSession, FrameInput]) -> dict[AsyncSession, Outputs]:
    """One frame for each session: one FrameGroup per stream and model, answered together.
    Raises FrameGroupError (holding the others' outputs) when some of them failed."""
    by_stream: dict[tuple[int, str], list[tuple[AsyncSession, FrameInput]]] = {}
    for session, frame in frames.items():
        by_stream.setdefault((id(session._mux), session.model.name), []).append((session, frame))
    groups = []
    for rows in by_stream.values():
        sessions = [session for session, _ in rows]
        model = sessions[0].model
        inputs, squeeze = stack_frames(model, [frame for _, frame in rows], _input_axes(model))
        groups.append(
            (sessions, GroupCall(model, [s.id for s in sessions], [], inputs, squeeze, True))
        )
    await _send(groups)
    outputs: dict[AsyncSession, Outputs] = {}
    errors: dict[AsyncSession, RnnstreamError] = {}
    for sessions, group in groups:
        await group.done
        answers, failed = group.per_session()
        for row, (session, result) in enumerate(zip(sessions, answers, strict=True)):
            if result is not None:
                outputs[session] = result
            else:
                errors[session] = failed[row]
    if errors:
        raise FrameGroupError(outputs, errors)
    return outputs


async def step_stacked(sessions: Sequence[AsyncSession], frames: FrameInput) -> Outputs:
    """The frames of `sessions` (row k is sessions[k]'s: an array, or arrays by input name,
    with the K sessions first) in one FrameGroup; the outputs likewise, K rows first. Raises
    FrameGroupError when some rows failed (its `outputs` holds these arrays, failed rows zero)."""
    if not sessions:
        return {}
    model, mux = sessions[0].model, sessions[0]._mux
    if any(s._mux is not mux or s.model.name != model.name for s in sessions):
        raise ValueError("step_stacked takes sessions of one model on one stream; use step_many")
    inputs, squeeze = stacked_arrays(model, frames, len(sessions), _input_axes(model))
    group = GroupCall(model, [s.id for s in sessions], [], inputs, squeeze, True)
    await _send([(list(sessions), group)])
    await group.done
    outputs, failed = group.stacked()
    if failed:
        raise FrameGroupError(outputs, {sessions[row]: error for row, error in failed.items()})
    return outputs


def _input_axes(model: ModelInfo) -> dict[str, int]:
    return {t.name: t.batch_axis or 0 for t in model.inputs}


async def _send(groups: list[tuple[list[AsyncSession], GroupCall]]) -> None:
    """Number each row (its session's next index) and write each group on its stream."""
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


def _same_arrays(a: NamedArrays, b: NamedArrays) -> bool:
    return len(a) == len(b) and all(
        n1 == n2 and x.shape == y.shape and x.dtype == y.dtype
        for (n1, x), (n2, y) in zip(a, b, strict=True)
    )
