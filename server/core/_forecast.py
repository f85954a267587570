"""Forecast rollouts: feeding a model's outputs back in as its next inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._errors import FailedPrecondition, InvalidArgument
from rnnstream.server.core._models import ModelSpec, TensorSpec, step_shape
from rnnstream.server.core._results import FrameOutput
from rnnstream.server.core._validation import NamedArray, validate_frame
from rnnstream.server.core._work import ForecastParams

__all__ = [
    "Rollout",
    "check_answer_size",
    "check_fed",
    "first_from_frame",
    "first_from_last",
    "forecast_params",
    "last_step",
]

Arrays = list[npt.NDArray[Any]]


@dataclass(frozen=True)
class Rollout:
    outputs: Arrays
    states: Arrays  # after the final step, one per state, without the batch axis
    last_step: Arrays  # the final step's outputs, shaped as a one-step frame's outputs


def last_step(spec: TensorSpec, frame: npt.NDArray[Any]) -> npt.NDArray[Any]:
    axis = spec.frame_time_axis
    return frame if axis is None else np.take(frame, frame.shape[axis] - 1, axis=axis)


def check_fed(model: ModelSpec, i: int, value: npt.NDArray[Any], step: int) -> None:
    """A value about to be fed back must fit the input, and be finite."""
    spec = model.inputs[i]
    where = "the session's last output" if step == 1 else f"the output of step {step - 1}"
    want = step_shape(spec)
    if (
        value.dtype != spec.dtype
        or len(want) != value.ndim
        or any(w is not None and w != g for w, g in zip(want, value.shape, strict=True))
    ):
        raise FailedPrecondition(
            f"forecast step {step}: {where} ({value.dtype.name} {list(value.shape)}) does not fit "
            f"input {spec.name!r} ({spec.dtype.name} {[d or '?' for d in want]})"
        )
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise FailedPrecondition(
            f"forecast step {step}: {where} holds NaN or infinity; the rollout diverged"
        )


def first_from_last(model: ModelSpec, last: FrameOutput | None) -> Arrays:
    """Step 1's inputs taken from the last time step of the session's last output."""
    if last is None:
        raise FailedPrecondition(
            "forecast needs a starting input: the session has applied no frame since it was "
            "opened or reset; send a frame first or give the first step's inputs"
        )
    first: Arrays = [np.empty(0)] * len(model.inputs)
    for i, o in model.feedback:
        first[i] = last_step(model.outputs[o], last.outputs[o])
    return first


def first_from_frame(model: ModelSpec, arrays: Arrays) -> Arrays:
    """Step 1's inputs given by the client: a validated frame of exactly one time step."""
    first: Arrays = []
    for spec, array in zip(model.inputs, arrays, strict=True):
        axis = spec.frame_time_axis
        if axis is not None:
            if array.shape[axis] != 1:
                raise InvalidArgument(
                    f"forecast input {spec.name!r} must hold one time step, got {array.shape[axis]}"
                )
            array = np.take(array, 0, axis=axis)
        first.append(array)
    return first


# Room for everything in a forecast's answer besides the tensor bytes (ids, names, shapes).
_MESSAGE_OVERHEAD = 1024


def _step_bytes(spec: ModelSpec) -> int | None:
    """Bytes of one rollout step's outputs, when the model fixes them."""
    total = 0
    for out in spec.outputs:
        dims = [1 if i == out.frame_time_axis else d for i, d in enumerate(out.frame_shape)]
        if any(d is None for d in dims):
            return None
        total += math.prod(d for d in dims if d is not None) * out.dtype.itemsize
    return total


def check_answer_size(size: int, limit: int, session_id: str, most_steps: str = "") -> None:
    """A forecast whose answer would not fit in a message is refused before anything changes:
    once committed, an answer too big to send would leave the client not knowing the state."""
    if size + _MESSAGE_OVERHEAD > limit:
        raise InvalidArgument(
            f"the forecast's outputs would take {size} bytes, over the server's message limit of "
            f"{limit} bytes (--max-message-bytes); ask for fewer steps{most_steps}",
            session_id=session_id,
        )


def forecast_params(
    spec: ModelSpec,
    session_id: str,
    steps: int,
    commit: bool,
    tensors: Sequence[NamedArray],
    max_steps: int,
    max_message_bytes: int,
) -> ForecastParams:
    """A forecast request checked against the model and the limits: `tensors` are step 1's
    inputs (none: the session's last output feeds step 1)."""
    if not spec.feedback:
        raise FailedPrecondition(spec.feedback_problem, session_id=session_id)
    if not 1 <= steps <= max_steps:
        raise InvalidArgument(
            f"forecast steps must be between 1 and {max_steps} (--max-forecast-steps), got {steps}",
            session_id=session_id,
        )
    per_step = _step_bytes(spec)
    if per_step:
        most = max(0, (max_message_bytes - _MESSAGE_OVERHEAD) // per_step)
        check_answer_size(steps * per_step, max_message_bytes, session_id, f" (at most {most})")
    first = None
    if tensors:
        try:
            first = first_from_frame(spec, validate_frame(spec, tensors, max_steps))
        except InvalidArgument as exc:
            exc.session_id = session_id
            raise
    return ForecastParams(steps, commit, first, max_message_bytes)
