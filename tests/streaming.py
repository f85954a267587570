"""Helpers for the integration tests: inputs, independent references, raw rnnstream.v1 calls."""

from __future__ import annotations

import functools
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.conftest import MODELS
from tests.reference import Reference, load_reference

MODEL_NAMES = ("rnn_tanh", "rnn_relu", "gru", "lstm")
FEATURES = {"rnn_tanh": 32, "rnn_relu": 32, "gru": 16, "lstm": 64}
HIDDEN = {"rnn_tanh": 64, "rnn_relu": 64, "gru": 128, "lstm": 96}
ATOL = 1e-5

F32 = npt.NDArray[np.float32]


def sequence(model: str, steps: int, seed: int) -> F32:
    """A random input sequence [steps, F] for `model`."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((steps, FEATURES[model])).astype(np.float32)


@functools.cache
def ort_session(model: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(MODELS / model / "model.onnx"), providers=["CPUExecutionProvider"]
    )


@functools.cache
def numpy_reference(model: str) -> Reference:
    return load_reference(MODELS / model / "model.onnx")


def ort_full(model: str, x: F32) -> F32:
    """One full-sequence ONNX Runtime run from the zero state: y [T, H]."""
    session = ort_session(model)
    feeds: dict[str, Any] = {"x": x[:, None, :]}
    for graph_input in session.get_inputs():
        if graph_input.name != "x":
            feeds[graph_input.name] = np.zeros((1, 1, HIDDEN[model]), np.float32)
    y: F32 = session.run(["y"], feeds)[0][:, 0]
    return y


def numpy_full(model: str, x: F32) -> F32:
    """The numpy cell equations run over x [T, F] from the zero state: y [T, H]."""
    ref = numpy_reference(model)
    y, _ = ref.run(x, ref.initial_state())
    return y


def assert_matches_references(model: str, x: F32, y: npt.ArrayLike) -> None:
    """`y` equals both independent references for the sequence `x`, within ATOL."""
    got = np.asarray(y)
    assert got.shape == (len(x), HIDDEN[model])
    np.testing.assert_allclose(got, ort_full(model, x), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got, numpy_full(model, x), rtol=0, atol=ATOL)


def frame_request(session_id: str, index: int, *tensors: pb.Tensor) -> pb.StreamRequest:
    return pb.StreamRequest(
        frame=pb.Frame(session_id=session_id, frame_index=index, inputs=list(tensors))
    )


def x_tensor(x: npt.NDArray[Any]) -> pb.Tensor:
    return encode(x, "x")


class RawStream:
    """One rnnstream.v1 Stream call driven message by message, for exact control of the wire."""

    def __init__(
        self,
        target: str,
        metadata: tuple[tuple[str, str], ...] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.channel = (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials)
        )
        self.stub = pb_grpc.RnnstreamStub(self.channel)
        self.call = self.stub.Stream(metadata=metadata)

    async def __aenter__(self) -> RawStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        await self.channel.close()

    async def request(self, request: pb.StreamRequest) -> pb.StreamResponse:
        """Send one message and return the one response it gets."""
        await self.call.write(request)
        response = await self.call.read()
        assert isinstance(response, pb.StreamResponse), response
        return response

    async def open(self, model: str, session_id: str = "") -> pb.SessionOpened:
        response = await self.request(
            pb.StreamRequest(open=pb.OpenSession(model=model, session_id=session_id))
        )
        assert response.WhichOneof("kind") == "opened", response
        return response.opened

    async def frame(self, session_id: str, index: int, x: npt.NDArray[Any]) -> F32:
        """Send one valid frame and return its output y."""
        response = await self.request(frame_request(session_id, index, x_tensor(x)))
        assert response.WhichOneof("kind") == "output", response
        assert response.output.frame_index == index
        (tensor,) = response.output.outputs
        assert tensor.name == "y"
        y: F32 = np.array(decode(tensor))
        return y

    async def error(self, request: pb.StreamRequest) -> pb.StreamError:
        response = await self.request(request)
        assert response.WhichOneof("kind") == "error", response
        return response.error
