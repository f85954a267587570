"""Convert between numpy arrays and rnnstream.v1.Tensor messages (hand-written, not generated)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from rnnstream.proto.v1 import rnnstream_pb2 as pb

__all__ = [
    "DTYPE_TO_NUMPY",
    "NUMPY_TO_DTYPE",
    "TensorDecodeError",
    "decode",
    "encode",
    "encode_into",
]

DTYPE_TO_NUMPY: dict[int, np.dtype[np.generic]] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.INT8: np.dtype("i1"),
    pb.UINT8: np.dtype("u1"),
    pb.BOOL: np.dtype("?"),
}
NUMPY_TO_DTYPE: dict[np.dtype[np.generic], int] = {
    dt.newbyteorder("="): code for code, dt in DTYPE_TO_NUMPY.items()
}


_BIG_ENDIAN_HOST = not np.little_endian


class TensorDecodeError(ValueError):
    """A Tensor message whose dtype, shape and bytes do not describe a valid array."""


# (dtype code, shape) -> (numpy dtype, byte count) of layouts already seen valid: a stream
# repeats one layout, so the per-frame path is one lookup.
_KNOWN_LAYOUTS: dict[tuple[int, tuple[int, ...]], tuple[np.dtype[np.generic], int]] = {}


def decode(tensor: pb.Tensor) -> npt.NDArray[np.generic]:
    """Return a read-only array viewing the message's bytes (no copy)."""
    shape = tuple(tensor.shape)
    known = _KNOWN_LAYOUTS.get((tensor.dtype, shape))
    if known is not None and len(tensor.data) == known[1] and not _BIG_ENDIAN_HOST:
        return np.frombuffer(tensor.data, dtype=known[0]).reshape(shape)
    dtype = DTYPE_TO_NUMPY.get(tensor.dtype)
    # The per-frame path: checks are cheap comparisons; messages are built only on failure.
    if dtype is None:
        raise TensorDecodeError(f"{_label(tensor)} has unsupported dtype {tensor.dtype}")
    if any(d < 0 for d in shape):
        raise TensorDecodeError(f"{_label(tensor)} has a negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorDecodeError(
            f"{_label(tensor)} has {len(tensor.data)} bytes but dtype {dtype.name} and shape "
            f"{list(shape)} need {expected}"
        )
    try:
        array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError as exc:  # e.g. a zero-size shape whose other dimensions overflow
        raise TensorDecodeError(
            f"{_label(tensor)} has an unusable shape {list(shape)}: {exc}"
        ) from None
    if _BIG_ENDIAN_HOST and dtype.byteorder == "<":  # pragma: no cover - big-endian hosts
        array = array.astype(dtype.newbyteorder("="))
    if len(_KNOWN_LAYOUTS) >= 1024:  # many distinct shapes: start over, stay small
        _KNOWN_LAYOUTS.clear()
    _KNOWN_LAYOUTS[(tensor.dtype, shape)] = (dtype, expected)
    return array


def _label(tensor: pb.Tensor) -> str:
    name = tensor.name
    if len(name) > 64:  # an error repeats only the start of a long name
        return f"tensor {name[:64]!r}... ({len(name)} characters)"
    return f"tensor {name!r}" if name else "tensor"


def encode(array: npt.NDArray[np.generic], name: str = "") -> pb.Tensor:
    """Serialise an array as a Tensor message (little-endian, C order)."""
    if not _BIG_ENDIAN_HOST:
        fast = NUMPY_TO_DTYPE.get(array.dtype)  # only native-order dtypes match here
        if fast is not None:  # the per-frame path: tobytes() writes C order from any layout
            return pb.Tensor(name=name, dtype=fast, shape=array.shape, data=array.tobytes())  # type: ignore[arg-type]
    native = array.dtype.newbyteorder("=") if array.dtype.byteorder != "|" else array.dtype
    code = NUMPY_TO_DTYPE.get(native)
    if code is None:
        raise TypeError(f"dtype {array.dtype} cannot travel as an rnnstream tensor")
    wire = DTYPE_TO_NUMPY[code]
    data = np.ascontiguousarray(array, dtype=wire).tobytes()
    return pb.Tensor(name=name, dtype=code, shape=array.shape, data=data)  # type: ignore[arg-type]


def encode_into(message: pb.Tensor, array: npt.NDArray[np.generic], name: str = "") -> None:
    """Fill an empty Tensor message in place, e.g. one from `repeated.add()`: cheaper than
    building a Tensor and copying it into its parent."""
    code = None if _BIG_ENDIAN_HOST else NUMPY_TO_DTYPE.get(array.dtype)
    if code is None:
        message.CopyFrom(encode(array, name))
        return
    message.name = name
    message.dtype = code  # type: ignore[assignment]
    message.shape.extend(array.shape)
    message.data = array.tobytes()
