"""Several tritonclient clients, each with its own credentials, take turns against one server.

Run by tests under .venv-triton's python (tritonclient registers the `inference` protobuf package
too, so it runs in its own process). Usage: python oip_triton_tenants.py PLAN.json OUT.json
PLAN: {"target": "HOST:PORT", "clients": {NAME: {"token": ..., "ca": PATH, "cert": PATH,
"key": PATH}}, "steps": [{"client": NAME, "call": "infer" | "is_server_live" |
"is_server_ready" | "is_model_ready" | "get_server_metadata", "model": ..., "x": [[...]],
"sequence_id": ..., "start": bool, "end": bool}]}. Every key of a client is optional.
OUT: one entry per step: {"ok": true, "value": ...} or {"ok": false, "status": ..., "message": ...}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton


def _client(target: str, spec: dict[str, Any]) -> tuple[triton.InferenceServerClient, Any]:
    tls = "ca" in spec
    client = triton.InferenceServerClient(
        target,
        ssl=tls,
        root_certificates=spec.get("ca"),
        private_key=spec.get("key"),
        certificate_chain=spec.get("cert"),
    )
    headers = {"authorization": f"Bearer {spec['token']}"} if "token" in spec else None
    return client, headers


def _call(client: triton.InferenceServerClient, headers: Any, step: dict[str, Any]) -> Any:
    call = step["call"]
    if call == "infer":
        x = np.asarray(step["x"], np.float32)[None]  # a batch of one
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(
            step["model"],
            [tensor],
            sequence_id=step.get("sequence_id", 0),
            sequence_start=step.get("start", False),
            sequence_end=step.get("end", False),
            headers=headers,
        )
        return result.as_numpy("y")[0].tolist()
    if call == "is_model_ready":
        return client.is_model_ready(step["model"], headers=headers)
    if call == "get_server_metadata":
        return client.get_server_metadata(headers=headers, as_json=True)
    return getattr(client, call)(headers=headers)


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    clients = {name: _client(plan["target"], spec) for name, spec in plan["clients"].items()}
    results: list[dict[str, Any]] = []
    for step in plan["steps"]:
        client, headers = clients[step["client"]]
        try:
            results.append({"ok": True, "value": _call(client, headers, step)})
        except triton.InferenceServerException as exc:
            results.append({"ok": False, "status": exc.status(), "message": exc.message()})
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
