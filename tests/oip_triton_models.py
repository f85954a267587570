"""Drives model loads and unloads through tritonclient while sequences stream; run by the tests
under .venv-triton's python (tritonclient cannot share rnnstream's environment).
Usage: python oip_triton_models.py TARGET PLAN.json ARRAYS.npz OUT.npz
PLAN.json is a list of steps run in order over one ModelStreamInfer stream, kept open:
  {"send": [request, ...]}  every request sent, then all their answers read
  {"load": NAME} / {"unload": NAME}   RepositoryModelLoad / RepositoryModelUnload
  {"index": LABEL}   the repository index, kept under LABEL
  {"config": NAME, "label": LABEL}   the model's ModelConfig, kept under LABEL
A request: {"model", "sequence_id", "input", "id", "start", "end", "version"}. Outputs land in
OUT.npz by request id; OUT.npz's "report" holds errors, versions answered and what was kept.
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from oip_triton_driver import _input, _kwargs


def _send(client: Any, answers: queue.Queue[Any], step: list[dict[str, Any]], arrays: Any,
          outputs: dict[str, Any], report: dict[str, Any]) -> None:  # fmt: skip
    for request in step:
        client.async_stream_infer(
            request["model"],
            [_input("x", arrays[request["input"]])],
            model_version=str(request.get("version", "")),
            **_kwargs(request),
        )
    for _ in step:
        result, error = answers.get(timeout=120)
        if error is not None:
            report["stream_errors"].append(str(error))
            continue
        response = result.get_response()
        outputs[response.id] = result.as_numpy("y")
        report["versions"][response.id] = response.model_version


def main() -> None:
    target, plan_path, arrays_path, out_path = sys.argv[1:5]
    plan = json.loads(Path(plan_path).read_text())
    arrays = dict(np.load(arrays_path))
    client = triton.InferenceServerClient(target)
    outputs: dict[str, Any] = {}
    report: dict[str, Any] = {"stream_errors": [], "versions": {}, "control_errors": []}
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for step in plan:
        if "send" in step:
            _send(client, answers, step["send"], arrays, outputs, report)
        elif "load" in step or "unload" in step:
            try:
                if "load" in step:
                    client.load_model(step["load"])
                else:
                    client.unload_model(step["unload"])
            except triton.InferenceServerException as exc:
                report["control_errors"].append([exc.status(), exc.message()])
        elif "index" in step:
            report[step["index"]] = client.get_model_repository_index(as_json=True)
        elif "config" in step:
            report[step["label"]] = client.get_model_config(step["config"], as_json=True)
    client.stop_stream()
    np.savez(out_path, report=np.array(json.dumps(report)), **outputs)


if __name__ == "__main__":
    main()
