"""Model specs: which ONNX inputs/outputs carry data and which carry state, and along which axes."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ModelConfigError", "ModelSpec", "StateSpec", "TensorSpec", "build_spec", "ort_dtype"]

# Name pairs of the common exports: ONNX RNN/GRU/LSTM ops and PyTorch's h0/c0 -> hn/cn.
KNOWN_STATE_PAIRS: dict[str, str] = {
    "initial_h": "Y_h",
    "initial_c": "Y_c",
    "h0": "hn",
    "c0": "cn",
}
_BATCH_NAME = re.compile(r"batch|^n$|^b$|^N$", re.IGNORECASE)
_TIME_NAME = re.compile(r"time|seq|step|len", re.IGNORECASE)

_ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

CONFIG_HELP = """\
Write models/{name}/config.toml, for example:

  [inputs.x]            # every data input: its batch axis and time axis
  batch_axis = 1
  time_axis = 0
  [outputs.y]
  batch_axis = 1
  time_axis = 0
  [[states]]            # every state input -> state output pair
  input = "initial_h"
  output = "Y_h"
  batch_axis = 1
  # initial = "h0.npy"  # optional initial state (state shape without the batch axis)
"""


class ModelConfigError(Exception):
    """The model cannot be served as it stands; the message says what to change."""


def ort_dtype(type_name: str) -> np.dtype[Any]:
    try:
        return np.dtype(_ORT_DTYPES[type_name])
    except KeyError:
        raise ModelConfigError(f"unsupported tensor type {type_name}") from None


@dataclass(frozen=True)
class TensorSpec:
    """A data tensor of the graph. `shape` holds None for dynamic axes."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    batch_axis: int
    time_axis: int | None

    @property
    def frame_shape(self) -> tuple[int | None, ...]:
        """Shape one session sends or receives: the batch axis removed."""
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1 :]

    @property
    def frame_time_axis(self) -> int | None:
        if self.time_axis is None:
            return None
        return self.time_axis - (1 if self.time_axis > self.batch_axis else 0)


@dataclass(frozen=True)
class StateSpec:
    """A recurrent state: fed in through `input_name`, read back from `output_name`."""

    input_name: str
    output_name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    batch_axis: int
    initial: npt.NDArray[Any]  # one session's initial state: shape without the batch axis


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]
    # Forecast rollouts: (input index, output index) pairs, the output feeding the input.
    feedback: tuple[tuple[int, int], ...] = ()
    # Why the model cannot forecast, when `feedback` is empty.
    feedback_problem: str = ""


@dataclass(frozen=True)
class GraphTensor:
    """An input or output as ONNX Runtime reports it."""

    name: str
    type_name: str
    shape: tuple[int | str | None, ...]


def _dynamic(dim: int | str | None) -> bool:
    return not isinstance(dim, int) or dim <= 0


def _find_axis(shape: Sequence[int | str | None], pattern: re.Pattern[str]) -> int | None:
    hits = [i for i, d in enumerate(shape) if isinstance(d, str) and pattern.search(d)]
    return hits[0] if len(hits) == 1 else None


def _axes(
    t: GraphTensor, cfg: Mapping[str, Any] | None, *, model: str, is_state: bool
) -> tuple[int, int | None]:
    """Batch and time axes of a tensor: from its config entry, else from its dim names."""
    rank = len(t.shape)
    if cfg is not None and "batch_axis" in cfg:
        batch = int(cfg["batch_axis"])
        time = cfg.get("time_axis")
        time = None if time is None or int(time) < 0 else int(time)
    else:
        batch_found = _find_axis(t.shape, _BATCH_NAME)
        time_found = None if is_state else _find_axis(t.shape, _TIME_NAME)
        dynamic = [i for i, d in enumerate(t.shape) if _dynamic(d)]
        if batch_found is None and is_state and len(dynamic) == 1:
            batch_found = dynamic[0]
        if batch_found is None and not is_state and rank == 3 and dynamic[:2] == [0, 1]:
            # Unnamed dims in the ONNX RNN op's default layout: [time, batch, features].
            batch_found, time_found = 1, 0
        if batch_found is None:
            raise ModelConfigError(
                f"model {model!r}: cannot tell which axis of {t.name!r} (shape "
                f"{list(t.shape)}) holds the batch; export it with a dynamic batch axis named "
                f"'batch' or name the axes in config.toml.\n{CONFIG_HELP.format(name=model)}"
            )
        batch, time = batch_found, time_found
    for axis in (batch, time):
        if axis is not None and not 0 <= axis < rank:
            raise ModelConfigError(
                f"model {model!r}: axis {axis} is out of range for {t.name!r} of rank {rank}"
            )
    if batch == time:
        raise ModelConfigError(f"model {model!r}: {t.name!r} has the same batch and time axis")
    if not _dynamic(t.shape[batch]):
        raise ModelConfigError(
            f"model {model!r}: {t.name!r} has a fixed size {t.shape[batch]} on its batch axis "
            f"{batch}; re-export it with that axis dynamic so sessions can be batched"
        )
    return batch, time


def _concrete(shape: Sequence[int | str | None]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def _initial_state(
    folder: Path, model: str, t: GraphTensor, batch: int, cfg: Mapping[str, Any]
) -> npt.NDArray[Any]:
    dtype = ort_dtype(t.type_name)
    per_session = [d for i, d in enumerate(t.shape) if i != batch]
    if "initial" in cfg:
        array = np.load(folder / str(cfg["initial"]))
        if len(array.shape) != len(per_session) or any(
            isinstance(d, int) and d != a for d, a in zip(per_session, array.shape, strict=True)
        ):
            raise ModelConfigError(
                f"model {model!r}: initial state for {t.name!r} has shape {list(array.shape)}, "
                f"expected {per_session} (the state shape without its batch axis)"
            )
        return np.ascontiguousarray(array, dtype=dtype)
    if any(_dynamic(d) for d in per_session):
        raise ModelConfigError(
            f"model {model!r}: state {t.name!r} has dynamic axes besides the batch axis "
            f"(shape {list(t.shape)}); give its initial value as a .npy file in config.toml "
            f'(initial = "...")'
        )
    return np.zeros([int(d) for d in per_session if isinstance(d, int)], dtype=dtype)


def build_spec(
    name: str,
    path: Path,
    inputs: Sequence[GraphTensor],
    outputs: Sequence[GraphTensor],
    config: Mapping[str, Any] | None = None,
    files: Path | None = None,
) -> ModelSpec:
    """Work out a model's data tensors and state pairs from its graph and optional config (whose
    file names are relative to `files`, by default the graph's folder)."""
    config = dict(config or {})
    in_by_name = {t.name: t for t in inputs}
    out_by_name = {t.name: t for t in outputs}
    state_cfgs: list[Mapping[str, Any]] = list(config.get("states", []))
    if not state_cfgs:
        state_cfgs = [
            {"input": i, "output": o}
            for i, o in KNOWN_STATE_PAIRS.items()
            if i in in_by_name and o in out_by_name
        ]
    if not state_cfgs:
        raise ModelConfigError(
            f"model {name!r}: found no state input/output pair (inputs "
            f"{sorted(in_by_name)}, outputs {sorted(out_by_name)}); rnnstream recognises "
            f"initial_h/initial_c -> Y_h/Y_c and h0/c0 -> hn/cn.\n{CONFIG_HELP.format(name=name)}"
        )
    states: list[StateSpec] = []
    for sc in state_cfgs:
        i_name, o_name = str(sc.get("input", "")), str(sc.get("output", ""))
        if i_name not in in_by_name or o_name not in out_by_name:
            raise ModelConfigError(
                f"model {name!r}: state pair {i_name!r} -> {o_name!r} does not name a graph "
                f"input and output (inputs {sorted(in_by_name)}, outputs {sorted(out_by_name)})"
            )
        t = in_by_name[i_name]
        batch, _ = _axes(t, sc, model=name, is_state=True)
        out_t = out_by_name[o_name]
        if t.type_name != out_t.type_name:
            raise ModelConfigError(
                f"model {name!r}: state {i_name!r} is {t.type_name} but {o_name!r} is "
                f"{out_t.type_name}"
            )
        states.append(
            StateSpec(
                input_name=i_name,
                output_name=o_name,
                dtype=ort_dtype(t.type_name),
                shape=_concrete(t.shape),
                batch_axis=batch,
                initial=_initial_state(files or path.parent, name, t, batch, sc),
            )
        )
    state_ins = {s.input_name for s in states}
    state_outs = {s.output_name for s in states}

    def data_specs(
        tensors: Sequence[GraphTensor], skip: set[str], section: str
    ) -> tuple[TensorSpec, ...]:
        section_cfg: Mapping[str, Any] = config.get(section, {})
        specs = []
        for t in tensors:
            if t.name in skip:
                continue
            batch, time = _axes(t, section_cfg.get(t.name), model=name, is_state=False)
            specs.append(
                TensorSpec(t.name, ort_dtype(t.type_name), _concrete(t.shape), batch, time)
            )
        return tuple(specs)

    data_in = data_specs(inputs, state_ins, "inputs")
    data_out = data_specs(outputs, state_outs, "outputs")
    if not data_in:
        raise ModelConfigError(f"model {name!r}: has no data input besides its state inputs")
    if not data_out:
        raise ModelConfigError(f"model {name!r}: has no data output besides its state outputs")
    feedback, problem = plan_feedback(name, data_in, data_out, config.get("forecast"))
    return ModelSpec(name, path, data_in, data_out, tuple(states), feedback, problem)


def step_shape(t: TensorSpec) -> tuple[int | None, ...]:
    """Shape of one time step of a session's tensor: the frame shape without its time axis."""
    shape, axis = t.frame_shape, t.frame_time_axis
    return shape if axis is None else shape[:axis] + shape[axis + 1 :]


def _feed_problem(i: TensorSpec, o: TensorSpec) -> str:
    if i.dtype != o.dtype:
        return f"output {o.name!r} is {o.dtype.name} but input {i.name!r} is {i.dtype.name}"
    ishape, oshape = step_shape(i), step_shape(o)
    if len(ishape) != len(oshape) or any(
        a is not None and b is not None and a != b for a, b in zip(ishape, oshape, strict=False)
    ):
        return (
            f"one step of output {o.name!r} has shape {[d or '?' for d in oshape]} but one step of "
            f"input {i.name!r} has shape {[d or '?' for d in ishape]}"
        )
    return ""


def plan_feedback(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    cfg: Mapping[str, Any] | None,
) -> tuple[tuple[tuple[int, int], ...], str]:
    """Which output feeds which input in a forecast, from config.toml [forecast] or by shape.

    A model that cannot forecast still loads; the problem is kept for the Forecast call. A
    [forecast] section that names the wrong tensors is a config error.
    """
    in_idx = {t.name: n for n, t in enumerate(inputs)}
    out_idx = {t.name: n for n, t in enumerate(outputs)}
    if cfg is not None:
        feed = cfg.get("feed")
        if not isinstance(feed, Mapping) or not feed:
            raise ModelConfigError(
                f'model {name!r}: [forecast] needs feed = {{ input = "output", ... }}'
            )
        unknown = [k for k, v in feed.items() if k not in in_idx or v not in out_idx]
        if unknown or set(feed) != set(in_idx):
            raise ModelConfigError(
                f"model {name!r}: [forecast] feed must map every data input {sorted(in_idx)} to "
                f"a data output {sorted(out_idx)}; got {dict(feed)}"
            )
        pairs = [(in_idx[k], out_idx[str(v)]) for k, v in feed.items()]
        for i, o in pairs:
            if problem := _feed_problem(inputs[i], outputs[o]):
                raise ModelConfigError(f"model {name!r}: [forecast] feed: {problem}")
        return tuple(sorted(pairs)), ""
    if len(inputs) != 1 or len(outputs) != 1:
        return (), (
            f"model {name!r} has data inputs {sorted(in_idx)} and outputs {sorted(out_idx)}; "
            f"name which output feeds which input in config.toml: [forecast] feed = {{ input = "
            f'"output" }}'
        )
    if problem := _feed_problem(inputs[0], outputs[0]):
        return (), (
            f"model {name!r} cannot forecast: its output does not map onto its input ({problem})"
        )
    return ((0, 0),), ""


def load_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.toml"
    if not path.exists():
        return None
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{path}: {exc}") from None
