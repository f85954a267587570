"""Open Inference Protocol tensors <-> numpy arrays, and OIP shapes <-> session frame shapes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import model_config_pb2 as mc
from rnnstream.server.core import (
    InvalidArgument,
    ModelSpec,
    NamedArray,
    TensorSpec,
    quoted,
    quoted_list,
)

__all__ = [
    "CONFIG_TYPES",
    "DATATYPES",
    "batch_items",
    "decode_inputs",
    "encode_outputs",
    "oip_dims",
    "to_frame",
]

Array = npt.NDArray[Any]

# OIP datatype strings; FP16 (like BF16) travels only as raw bytes.
DATATYPES: dict[np.dtype[Any], str] = {
    np.dtype("bool"): "BOOL",
    np.dtype("uint8"): "UINT8",
    np.dtype("uint16"): "UINT16",
    np.dtype("uint32"): "UINT32",
    np.dtype("uint64"): "UINT64",
    np.dtype("int8"): "INT8",
    np.dtype("int16"): "INT16",
    np.dtype("int32"): "INT32",
    np.dtype("int64"): "INT64",
    np.dtype("float16"): "FP16",
    np.dtype("float32"): "FP32",
    np.dtype("float64"): "FP64",
}
_NUMPY: dict[str, np.dtype[Any]] = {name: dtype for dtype, name in DATATYPES.items()}
CONFIG_TYPES: dict[np.dtype[Any], mc.DataType.ValueType] = {
    dtype: mc.DataType.Value("TYPE_" + name) for dtype, name in DATATYPES.items()
}
# The width each typed contents field holds on the wire: values are read at that width, then
# checked against the input's own (narrower) range instead of wrapping around.
_FIELD_DTYPE: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype("bool"),
    "uint_contents": np.dtype("uint32"),
    "uint64_contents": np.dtype("uint64"),
    "int_contents": np.dtype("int32"),
    "int64_contents": np.dtype("int64"),
    "fp32_contents": np.dtype("float32"),
    "fp64_contents": np.dtype("float64"),
}
# More dimensions than any model input has; numpy itself stops at 64.
_MAX_DIMS = 32
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _dynamic_time(spec: TensorSpec) -> int | None:
    """The frame axis of a variable number of time steps, which OIP requests may leave out."""
    axis = spec.frame_time_axis
    if axis is None or spec.frame_shape[axis] is not None:
        return None
    return axis


def oip_dims(spec: TensorSpec) -> list[int]:
    """Shape of one request item (no batch axis): one time step, so the time axis is left out."""
    skip = _dynamic_time(spec)
    return [-1 if d is None else d for i, d in enumerate(spec.frame_shape) if i != skip]


def _fits(want: Sequence[int | None], got: Sequence[int]) -> bool:
    return len(want) == len(got) and all(
        w is None or w == g for w, g in zip(want, got, strict=True)
    )


def to_frame(
    spec: TensorSpec, item: Array, model: str, request_shape: Sequence[int]
) -> tuple[Array, bool]:
    """A request item as a session frame; True when the item left out its single time step."""
    time_axis = _dynamic_time(spec)
    one_step = [None if d < 0 else d for d in oip_dims(spec)]
    if time_axis is not None and _fits(one_step, item.shape):
        return np.expand_dims(item, time_axis), True
    if _fits(spec.frame_shape, item.shape):
        return item, False
    shapes = [[-1, *oip_dims(spec)]]
    if time_axis is not None:
        shapes.append([-1, *(-1 if d is None else d for d in spec.frame_shape)])
    raise InvalidArgument(
        f"model {model!r} input {spec.name!r} must have shape "
        + " or ".join(str(s) for s in shapes)
        + f" (batch first; -1 is any size), got {list(request_shape)}"
    )


def _one_input(
    tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None
) -> tuple[str, Array]:
    label = f"input {quoted(tensor.name)}"
    dtype = _NUMPY.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{label} has datatype {quoted(tensor.datatype)}; supported: {sorted(_NUMPY)}"
        )
    shape = tuple(tensor.shape)
    if len(shape) > _MAX_DIMS:
        raise InvalidArgument(f"{label} has {len(shape)} dimensions; at most {_MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{label} has a negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"{label} has {len(raw)} bytes of raw contents but {tensor.datatype} and shape "
                f"{list(shape)} need {count * dtype.itemsize}"
            )
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        return tensor.name, _reshaped(array, shape, label)
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(f"{label}: {tensor.datatype} data must travel in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{label} has {len(values)} values in contents.{field} but shape {list(shape)} "
            f"needs {count}"
        )
    wide = np.asarray(values, dtype=_FIELD_DTYPE[field])
    if dtype.kind in "iu" and wide.size and dtype != wide.dtype:
        limits = np.iinfo(dtype)
        low, high = wide.min(), wide.max()
        if low < limits.min or high > limits.max:
            bad = low if low < limits.min else high
            raise InvalidArgument(
                f"{label} holds {bad} in contents.{field}, out of range for {tensor.datatype} "
                f"({limits.min} to {limits.max})"
            )
    return tensor.name, _reshaped(wide.astype(dtype, copy=False), shape, label)


def _reshaped(array: Array, shape: tuple[int, ...], label: str) -> Array:
    try:
        return array.reshape(shape)
    except ValueError as exc:  # e.g. a zero-size shape whose other dimensions overflow
        raise InvalidArgument(f"{label} has an unusable shape {list(shape)}: {exc}") from None


def decode_inputs(request: oip.ModelInferRequest) -> list[tuple[str, Array]]:
    """The request's input tensors as arrays, batch axis first, from raw or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "give one per input, in the order of inputs"
        )
    arrays = []
    for i, tensor in enumerate(request.inputs):
        if raw and tensor.HasField("contents"):
            raise InvalidArgument(
                f"input {quoted(tensor.name)} has typed contents while raw_input_contents is used"
            )
        arrays.append(_one_input(tensor, raw[i] if raw else None))
    return arrays


def encode_outputs(
    specs: Sequence[TensorSpec],
    items: Sequence[Sequence[Array]],
    squeeze: bool,
    requested: Sequence[str],
    response: oip.ModelInferResponse,
) -> None:
    """Fill a response with each batch item's outputs, stacked on a leading batch axis."""
    names = [s.name for s in specs]
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise InvalidArgument(
            f"model has no output(s) {quoted_list(unknown)}; its outputs are {names}"
        )
    for i, spec in enumerate(specs):
        if requested and spec.name not in requested:
            continue
        per_item = [outputs[i] for outputs in items]
        time_axis = _dynamic_time(spec)
        if squeeze and time_axis is not None:
            per_item = [np.take(a, 0, axis=time_axis) for a in per_item]
        array = np.ascontiguousarray(np.stack(per_item), dtype=spec.dtype.newbyteorder("<"))
        response.outputs.add(name=spec.name, datatype=DATATYPES[spec.dtype], shape=array.shape)
        response.raw_output_contents.append(array.tobytes())


def batch_items(
    spec: ModelSpec,
    inputs: list[tuple[str, Any]],
    most: int,
    too_many: Callable[[int], InvalidArgument],
) -> tuple[list[list[NamedArray]], bool]:
    """Split the request's batch into session frames, refusing a batch of more than `most`
    (with `too_many(size)`) before any is made; True when items left out the time axis."""
    if not inputs:
        expected = [t.name for t in spec.inputs]
        raise InvalidArgument(f"request carries no inputs; model {spec.name!r} expects {expected}")
    by_name = {t.name: t for t in spec.inputs}
    sizes = {array.shape[0] if array.ndim else 0 for _, array in inputs}
    if len(sizes) != 1 or 0 in sizes:
        raise InvalidArgument(
            "every input must have the same batch size as its first dimension, at least 1; got "
            f"shapes {[list(a.shape) for _, a in inputs]}"
        )
    size = sizes.pop()
    if size > most:
        raise too_many(size)
    items: list[list[NamedArray]] = []
    squeezed: set[bool] = set()
    for i in range(size):
        item: list[NamedArray] = []
        for name, array in inputs:
            if name in by_name:
                frame, squeeze = to_frame(by_name[name], array[i], spec.name, array.shape)
                squeezed.add(squeeze)
            else:
                frame = array[i]  # the engine names the unknown input in its error
            item.append((name, frame))
        items.append(item)
    if len(squeezed) > 1:
        raise InvalidArgument("inputs disagree: some carry a time axis and some leave it out")
    return items, squeezed == {True}
