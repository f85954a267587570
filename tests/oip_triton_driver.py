"""Drives rnnstream through tritonclient's gRPC client; run by tests under .venv-triton's python.

tritonclient registers the `inference` protobuf package too, so it runs in its own process.
Usage: python oip_triton_driver.py TARGET PLAN.json ARRAYS.npz OUT.npz
The plan's "stream" requests go over one ModelStreamInfer stream, all sent before any answer is
read; "unary" requests go one by one through ModelInfer. Outputs land in OUT.npz by request id;
OUT.npz's "report" holds errors and the server/model descriptions as JSON.
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

_DATATYPE = {np.dtype("float32"): "FP32", np.dtype("float64"): "FP64", np.dtype("int64"): "INT64"}


def _input(name: str, array: np.ndarray[Any, Any]) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), _DATATYPE[array.dtype])
    tensor.set_data_from_numpy(array)
    return tensor


def _kwargs(step: dict[str, Any]) -> dict[str, Any]:
    return {
        "sequence_id": step.get("sequence_id", 0),
        "sequence_start": step.get("start", False),
        "sequence_end": step.get("end", False),
        "request_id": step["id"],
    }


def main() -> None:
    target, plan_path, arrays_path, out_path = sys.argv[1:5]
    plan = json.loads(Path(plan_path).read_text())
    arrays = dict(np.load(arrays_path))
    client = triton.InferenceServerClient(target)
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    report: dict[str, Any] = {"stream_errors": [], "unary_errors": {}}

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    stream = plan.get("stream", [])
    for step in stream:
        client.async_stream_infer(
            step["model"],
            [_input(step.get("input_name", "x"), arrays[step["input"]])],
            **_kwargs(step),
        )
    for _ in stream:
        result, error = answers.get(timeout=60)
        if error is not None:
            report["stream_errors"].append(str(error))
        else:
            response = result.get_response()
            outputs[response.id] = result.as_numpy("y")
            report.setdefault("stream_order", []).append(response.id)
    client.stop_stream()

    for step in plan.get("unary", []):
        try:
            result = client.infer(
                step["model"], [_input("x", arrays[step["input"]])], **_kwargs(step)
            )
            outputs[step["id"]] = result.as_numpy("y")
        except triton.InferenceServerException as exc:
            report["unary_errors"][step["id"]] = [exc.status(), exc.message()]

    # Typed contents (fp32_contents) instead of raw bytes, through the raw stub.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(target))
    for step in plan.get("typed", []):
        x = arrays[step["input"]]
        request = service_pb2.ModelInferRequest(model_name=step["model"], id=step["id"])
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
        request.parameters["sequence_id"].uint64_param = step["sequence_id"]
        request.parameters["sequence_start"].bool_param = step.get("start", False)
        request.parameters["sequence_end"].bool_param = step.get("end", False)
        response = stub.ModelInfer(request)
        raw = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        outputs[step["id"]] = raw.reshape(list(response.outputs[0].shape))
    report["repository_index"] = client.get_model_repository_index(as_json=True)

    report["server_metadata"] = client.get_server_metadata(as_json=True)
    report["server_live"] = client.is_server_live()
    report["model_ready"] = client.is_model_ready(plan["model"])
    report["model_metadata"] = client.get_model_metadata(plan["model"], as_json=True)
    report["model_config"] = client.get_model_config(plan["model"], as_json=True)
    report["statistics"] = json_format.MessageToDict(
        client.get_inference_statistics(plan["model"]), preserving_proto_field_name=True
    )
    np.savez(out_path, report=np.array(json.dumps(report)), **outputs)


if __name__ == "__main__":
    main()
