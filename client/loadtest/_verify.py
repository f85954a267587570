"""--verify: replay each session's frames through a local ONNX Runtime copy of the model."""

from __future__ import annotations

import asyncio
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream._frames import Outputs
from rnnstream._info import ModelInfo
from rnnstream.loadtest._frames import Frame
from rnnstream.loadtest._options import OptionsError

__all__ = ["TOLERANCE", "Reference", "SessionCheck", "Verifier", "VerifyStats"]

TOLERANCE = 1e-4  # absolute, per element
_CHUNK = 256  # frames per ORT call: bounds memory while keeping the calls few


def _frame_axis(axis: int | None, batch_axis: int | None) -> int:
    assert axis is not None  # only called for tensors with a time axis
    return axis - (1 if batch_axis is not None and batch_axis < axis else 0)


def _initial_states(path: Path, model: ModelInfo) -> dict[str, npt.NDArray[Any]]:
    """Each state's initial value with a batch of one: zeros, or config.toml's `initial`."""
    config_path = path.parent / "config.toml"
    given: dict[str, str] = {}
    if config_path.is_file():
        config = tomllib.loads(config_path.read_text())
        given = {
            str(s["input"]): str(s["initial"])
            for s in config.get("states", [])
            if "initial" in s and "input" in s
        }
    states: dict[str, npt.NDArray[Any]] = {}
    for s in model.states:
        dtype = s.numpy_dtype()
        if s.input_name in given:
            value = np.load(path.parent / given[s.input_name]).astype(dtype)
        elif any(d < 0 for i, d in enumerate(s.shape) if i != s.batch_axis):
            raise OptionsError(
                f"--verify: state {s.input_name!r} has dynamic axes and {config_path} gives no "
                "initial value for it"
            )
        else:
            value = np.zeros([d for i, d in enumerate(s.shape) if i != s.batch_axis], dtype)
        states[s.input_name] = (
            value if s.batch_axis is None else np.expand_dims(value, s.batch_axis)
        )
    return states


class Reference:
    """The model file run locally, a batch of one, carrying one session's state between calls."""

    def __init__(self, path: Path, model: ModelInfo) -> None:
        import onnxruntime as ort  # only --verify needs it: keep the command quick to start

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ort_inputs = {i.name for i in self._session.get_inputs()}
        ort_outputs = {o.name for o in self._session.get_outputs()}
        want_in = {t.name for t in model.inputs} | {s.input_name for s in model.states}
        want_out = {t.name for t in model.outputs} | {s.output_name for s in model.states}
        if want_in != ort_inputs or not want_out <= ort_outputs:
            raise OptionsError(
                f"--verify-model {path}: its inputs {sorted(ort_inputs)} and outputs "
                f"{sorted(ort_outputs)} do not match the served model's {sorted(want_in)} -> "
                f"{sorted(want_out)}"
            )
        self.model = model
        self.initial = _initial_states(path, model)
        self._fetch = [t.name for t in model.outputs] + [s.output_name for s in model.states]
        # Frames join into one sequence only when every data tensor has a time axis.
        tensors = [*model.inputs, *model.outputs]
        self.whole_sequences = all(
            t.time_axis is not None and t.batch_axis is not None for t in tensors
        )

    def run(
        self, frames: list[Frame], state: dict[str, npt.NDArray[Any]]
    ) -> tuple[list[Outputs], dict[str, npt.NDArray[Any]]]:
        """Outputs of each frame in turn, and the state after the last one."""
        if not self.whole_sequences:
            results: list[Outputs] = []
            for frame in frames:
                outputs, state = self._call([frame], state)
                results.extend(outputs)
            return results, state
        return self._call(frames, state)

    def _call(
        self, frames: list[Frame], state: dict[str, npt.NDArray[Any]]
    ) -> tuple[list[Outputs], dict[str, npt.NDArray[Any]]]:
        feed: dict[str, npt.NDArray[Any]] = dict(state)
        first = self.model.inputs[0]
        if self.whole_sequences:
            axis = _frame_axis(first.time_axis, first.batch_axis)
            steps = [f[first.name].shape[axis] for f in frames]
        for t in self.model.inputs:
            if self.whole_sequences:
                joined = np.concatenate(
                    [f[t.name] for f in frames], axis=_frame_axis(t.time_axis, t.batch_axis)
                )
            else:
                joined = frames[0][t.name]
            batch = t.batch_axis
            feed[t.name] = joined if batch is None else np.expand_dims(joined, batch)
        values = self._session.run(self._fetch, feed)
        n_out = len(self.model.outputs)
        new_state = {s.input_name: values[n_out + i] for i, s in enumerate(self.model.states)}
        per_frame: list[Outputs] = [{} for _ in frames]
        for t, value in zip(self.model.outputs, values[:n_out], strict=True):
            if t.batch_axis is not None:
                value = np.take(value, 0, axis=t.batch_axis)
            if self.whole_sequences:
                cuts = np.cumsum(steps)[:-1]
                parts = np.split(value, cuts, axis=_frame_axis(t.time_axis, t.batch_axis))
            else:
                parts = [value]
            for outputs, part in zip(per_frame, parts, strict=True):
                outputs[t.name] = part
        return per_frame, new_state


@dataclass
class VerifyStats:
    frames_checked: int = 0
    mismatched_frames: int = 0
    mismatched_sessions: int = 0
    unchecked_sessions: int = 0  # a frame of theirs failed, so their state is unknown
    max_abs_diff: float = 0.0
    reference_error: str = ""  # the local model failed on the served model's frames

    def add(self, other: VerifyStats) -> None:
        self.reference_error = self.reference_error or other.reference_error
        self.frames_checked += other.frames_checked
        self.mismatched_frames += other.mismatched_frames
        self.mismatched_sessions += other.mismatched_sessions
        self.unchecked_sessions += other.unchecked_sessions
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)


class SessionCheck:
    """One session's frames and answers, compared in order as they complete."""

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier
        self._frames: list[Frame] = []
        self._answers: dict[int, Outputs] = {}
        self._next = 0  # first frame not yet handed to the reference
        self._ready: list[tuple[Frame, Outputs]] = []
        self.state = dict(verifier.reference.initial)
        self.broken = False
        self.mismatched = False

    def sent(self, frame: Frame) -> int:
        self._frames.append(frame)
        return self._next + len(self._frames) - 1

    def answered(self, seq: int, outputs: Outputs) -> None:
        if self.broken:
            return
        self._answers[seq] = outputs
        offset = self._next + len(self._ready)
        while offset in self._answers:
            self._ready.append((self._frames[offset - self._next], self._answers.pop(offset)))
            offset += 1
        if len(self._ready) >= _CHUNK:
            self.flush()

    def failed(self) -> None:
        self.broken = True

    def flush(self) -> None:
        if not self._ready:
            return
        ready, self._ready = self._ready, []
        self._frames = self._frames[len(ready) :]
        self._next += len(ready)
        self._verifier.submit(self, ready)


class Verifier:
    """Runs the reference on a worker thread so the event loop keeps measuring."""

    def __init__(self, reference: Reference) -> None:
        self.reference = reference
        self.stats = VerifyStats()
        self._checks: list[SessionCheck] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rnnstream-verify")
        self._jobs: list[asyncio.Future[None]] = []

    def session(self) -> SessionCheck:
        check = SessionCheck(self)
        self._checks.append(check)
        return check

    def submit(self, check: SessionCheck, ready: list[tuple[Frame, Outputs]]) -> None:
        loop = asyncio.get_running_loop()
        self._jobs.append(loop.run_in_executor(self._executor, self._compare, check, ready))
        self._jobs = [j for j in self._jobs if not j.done()]

    def _compare(self, check: SessionCheck, ready: list[tuple[Frame, Outputs]]) -> None:
        # Jobs run one at a time in submission order, so each session's state chains correctly.
        stats = self.stats
        try:
            expected, check.state = self.reference.run([f for f, _ in ready], check.state)
        except Exception as exc:  # frames the local model cannot take: not the model served
            stats.reference_error = stats.reference_error or f"{type(exc).__name__}: {exc}"
            stats.frames_checked += len(ready)
            stats.mismatched_frames += len(ready)
            stats.max_abs_diff = float("inf")
            check.mismatched = True
            return
        for want, (_, got) in zip(expected, ready, strict=True):
            stats.frames_checked += 1
            worst = 0.0
            bad = set(want) != set(got)
            for name, array in want.items():
                other = got.get(name)
                if other is None or other.shape != array.shape:
                    bad = True
                    continue
                diff = float(np.max(np.abs(other.astype(np.float64) - array), initial=0.0))
                worst = max(worst, diff if np.isfinite(diff) else np.inf)
            stats.max_abs_diff = max(stats.max_abs_diff, worst)
            if bad or not worst <= TOLERANCE:
                stats.mismatched_frames += 1
                check.mismatched = True

    async def finish(self) -> VerifyStats:
        for check in self._checks:
            check.flush()
        if self._jobs:
            await asyncio.gather(*self._jobs)
        self._executor.shutdown(wait=True)
        self.stats.mismatched_sessions = sum(c.mismatched for c in self._checks)
        self.stats.unchecked_sessions = sum(c.broken for c in self._checks)
        return self.stats
