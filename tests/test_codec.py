"""rnnstream.proto.tensor_codec: numpy arrays to rnnstream.v1.Tensor and back."""

from __future__ import annotations

import numpy as np
import pytest

from rnnstream.proto.tensor_codec import (
    DTYPE_TO_NUMPY,
    TensorDecodeError,
    decode,
    encode,
    encode_into,
)
from rnnstream.proto.v1 import rnnstream_pb2 as pb

WIRE = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "float64": pb.FLOAT64,
    "int32": pb.INT32,
    "int64": pb.INT64,
    "int8": pb.INT8,
    "uint8": pb.UINT8,
    "bool": pb.BOOL,
}


def _sample(dtype: np.dtype[np.generic], shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 1000).astype(dtype)


def test_every_wire_dtype_is_covered() -> None:
    assert {np.dtype(name) for name in WIRE} == {
        d.newbyteorder("=") for d in DTYPE_TO_NUMPY.values()
    }


@pytest.mark.parametrize("name", sorted(WIRE))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)])
def test_round_trip(name: str, shape: tuple[int, ...]) -> None:
    array = _sample(np.dtype(name), shape)
    tensor = encode(array, "t")
    assert (tensor.name, tensor.dtype, tuple(tensor.shape)) == ("t", WIRE[name], shape)
    assert len(tensor.data) == array.size * array.itemsize
    # Bytes go over the wire as little-endian C order.
    assert tensor.data == array.astype(np.dtype(name).newbyteorder("<")).tobytes()
    wire = pb.Tensor.FromString(tensor.SerializeToString())
    back = decode(wire)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_extremes_survive() -> None:
    for dtype in (np.int32, np.int64):
        info = np.iinfo(dtype)
        array = np.array([info.min, -1, 0, 1, info.max], dtype)
        np.testing.assert_array_equal(decode(encode(array)), array)
    halves = np.array([np.finfo(np.float16).max, np.finfo(np.float16).tiny, -0.0, 1e-7], "f2")
    np.testing.assert_array_equal(decode(encode(halves)).view(np.uint16), halves.view(np.uint16))


def test_non_native_and_non_contiguous_arrays() -> None:
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    tensor = encode(big_endian)
    assert tensor.dtype == pb.INT32
    assert tensor.data == np.arange(6, dtype="<i4").tobytes()
    np.testing.assert_array_equal(decode(tensor), big_endian)
    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[::2, 1::2].T
    np.testing.assert_array_equal(decode(encode(strided)), strided)


def test_decode_makes_no_copy() -> None:
    tensor = encode(np.arange(12, dtype=np.float32).reshape(3, 4))
    data = tensor.data
    array = decode(pb.Tensor(dtype=tensor.dtype, shape=tensor.shape, data=data))
    assert not array.flags.owndata and not array.flags.writeable
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert isinstance(root.base, bytes)
    assert np.shares_memory(array, np.frombuffer(root.base, np.uint8))


@pytest.mark.parametrize("name", ["float32", "float16", "int64", "bool"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_byte_length_mismatch(name: str, delta: int) -> None:
    good = encode(np.zeros((2, 3), np.dtype(name)), "x")
    data = good.data + b"\0" if delta > 0 else good.data[:-1]
    bad = pb.Tensor(name="x", dtype=good.dtype, shape=[2, 3], data=data)
    with pytest.raises(TensorDecodeError) as exc:
        decode(bad)
    expected = 6 * np.dtype(name).itemsize
    assert f"has {len(bad.data)} bytes" in str(exc.value)
    assert f"need {expected}" in str(exc.value)
    assert "tensor 'x'" in str(exc.value)


def test_bad_dtype_and_shape() -> None:
    with pytest.raises(TensorDecodeError, match="unsupported dtype 0"):
        decode(pb.Tensor(shape=[1], data=b"\0\0\0\0"))
    with pytest.raises(TensorDecodeError, match="unsupported dtype 99"):
        decode(pb.Tensor(dtype=99, shape=[1], data=b"\0\0\0\0"))  # type: ignore[arg-type]
    with pytest.raises(TensorDecodeError, match="negative dimension"):
        decode(pb.Tensor(dtype=pb.FLOAT32, shape=[-1, 4], data=bytes(16)))
    with pytest.raises(TensorDecodeError, match=r"unusable shape \[0, 4611686018427387904\]"):
        decode(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 2**62], data=b""))
    with pytest.raises(TypeError, match="cannot travel"):
        encode(np.zeros(2, np.complex64))


@pytest.mark.parametrize("name", sorted(WIRE))
def test_encode_into_writes_what_encode_writes(name: str) -> None:
    native = _sample(np.dtype(name), (3, 4))
    for array in (native, native.T, native.astype(native.dtype.newbyteorder(">"))):
        parent = pb.FrameOutput()
        encode_into(parent.outputs.add(), array, "y")
        assert parent.outputs[0] == encode(array, "y")
        assert np.array_equal(decode(parent.outputs[0]), array)


def test_a_layout_seen_before_is_still_checked_for_its_byte_count() -> None:
    good = encode(np.zeros((2, 8), np.float32), "x")
    decode(good)  # remembered as a valid layout
    short = pb.Tensor(name="x", dtype=good.dtype, shape=good.shape, data=good.data[:-4])
    with pytest.raises(TensorDecodeError, match="has 60 bytes but dtype float32 and shape"):
        decode(short)
