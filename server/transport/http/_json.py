"""The OIP REST JSON forms: an inference request as the OIP protobuf request the OIP adapter
runs, its response back as JSON (tensor data row-major and flattened), model metadata."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.server.core import InvalidArgument, ModelInfo, TensorSpec, quoted
from rnnstream.server.transport.grpc._oip_codec import DATATYPES, oip_dims
from rnnstream.server.transport.grpc._oip_config import PLATFORM, ready_versions

__all__ = ["infer_request", "infer_response", "metadata"]

_NUMPY = {name: dtype for dtype, name in DATATYPES.items()}
_SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")


def _field(body: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidArgument(f"{where}{name} must be a JSON {kind.__name__}")
    return value


def _parameter(target: oip.InferParameter, name: str, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int) and 0 <= value < 2**64:
        target.uint64_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidArgument(f"parameter {quoted(name)} must be a bool, an integer or a string")


def _tensor(request: oip.ModelInferRequest, tensor: Any, n: int) -> None:
    where = f"inputs[{n}]."
    if not isinstance(tensor, dict):
        raise InvalidArgument(f"inputs[{n}] must be a JSON object")
    name = _field(tensor, "name", str, where) or ""
    datatype = _field(tensor, "datatype", str, where) or ""
    shape = _field(tensor, "shape", list, where)
    if shape is None or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidArgument(f"{where}shape must be a list of integers")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{where}shape {shape} has a negative dimension")
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        raise InvalidArgument(
            f"{where}datatype {quoted(datatype)} is not supported; use one of {sorted(_NUMPY)} "
            "(the binary data extension is not served: send the data as JSON)"
        )
    if "data" not in tensor:
        raise InvalidArgument(f"{where}data is missing")
    try:
        array = np.asarray(tensor["data"], dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{where}data is not a list of {datatype} values: {exc}") from None
    if array.size != math.prod(shape):
        raise InvalidArgument(
            f"{where}data holds {array.size} values but shape {shape} needs {math.prod(shape)}"
        )
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(array.astype(dtype.newbyteorder("<")).tobytes())


def infer_request(name: str, version: str, body: Any) -> oip.ModelInferRequest:
    """The OIP request a JSON inference request stands for; sequences by its parameters
    (sequence_id, sequence_start, sequence_end), as Triton's sequence extension has them."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object with inputs")
    request = oip.ModelInferRequest(model_name=name, model_version=version)
    request.id = _field(body, "id", str, "") or ""
    parameters = _field(body, "parameters", dict, "") or {}
    for key, value in parameters.items():
        if key in _SEQUENCE:  # others (priority, timeout, ...) change nothing here
            _parameter(request.parameters[key], key, value)
    inputs = _field(body, "inputs", list, "")
    if not inputs:
        raise InvalidArgument("inputs must be a non-empty list of tensors")
    for n, tensor in enumerate(inputs):
        _tensor(request, tensor, n)
    for n, output in enumerate(_field(body, "outputs", list, "") or []):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidArgument(f"outputs[{n}] must be an object with a name")
        request.outputs.add(name=output["name"])
    return request


def infer_response(response: oip.ModelInferResponse) -> dict[str, Any]:
    outputs = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        dtype = _NUMPY[tensor.datatype].newbyteorder("<")
        data = np.frombuffer(raw, dtype=dtype).tolist()
        outputs.append(
            {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
             "data": data}
        )  # fmt: skip
    answer: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        answer["id"] = response.id
    return answer


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": DATATYPES[spec.dtype], "shape": [-1, *oip_dims(spec)]}


def metadata(model: ModelInfo) -> dict[str, Any]:
    """Inputs and outputs, batch axis first; states are implicit and not listed."""
    return {
        "name": model.name,
        "versions": ready_versions(model),
        "platform": PLATFORM,
        "inputs": [_tensor_metadata(t) for t in model.spec.inputs],
        "outputs": [_tensor_metadata(t) for t in model.spec.outputs],
    }
