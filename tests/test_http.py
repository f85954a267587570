"""The Open Inference Protocol's REST API on --http-port, driven with real HTTP requests (httpx):
health, metadata, JSON inference stateless and in sequences, the model repository, errors as
{"error": ...} with the status of their code, and the same principals as gRPC."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from rnnstream.server.core import ErrorCode
from rnnstream.server.transport.http._status import HTTP_STATUS
from tests.conftest import RunningServer
from tests.pki import Pki
from tests.server_process import free_port
from tests.streaming import assert_matches_references, ort_full, sequence
from tests.versions import inputs, reference, write_version


@pytest.fixture(scope="module")
def http_server() -> Iterator[RunningServer]:
    from tests.conftest import test_settings

    running = RunningServer(test_settings(http_port=free_port(), models=("gru", "lstm")))
    yield running
    running.stop()


def _url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.settings.http_port}"


def _x(array: np.ndarray, name: str = "x") -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(array.shape),
        "datatype": "FP32",
        "data": array.ravel().tolist(),
    }


def test_health_metadata_and_config(http_server: RunningServer) -> None:
    with httpx.Client(base_url=_url(http_server)) as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        ready = http.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
        about = http.get("/v2").json()
        assert about["name"] == "rnnstream" and "model_repository" in about["extensions"]
        assert http.get("/v2/models/gru").json() == {
            "name": "gru",
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 128]}],
        }
        assert http.get("/v2/models/gru/versions/1/ready").json() == {"name": "gru", "ready": True}
        missing = http.get("/v2/models/gru/versions/2/ready")
        assert missing.status_code == 503 and missing.json()["ready"] is False
        config = http.get("/v2/models/lstm/config").json()
        assert config["max_batch_size"] == http_server.settings.max_batch_size
        assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
        unknown = http.get("/v2/models/nope")
        assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
        assert http.get("/v3").status_code == 404 and "error" in http.get("/v3").json()
        assert http.delete("/v2/models/gru").status_code == 405


def test_stateless_inference_in_json(http_server: RunningServer) -> None:
    x = sequence("gru", 2, seed=31)  # a batch of two one-step items
    with httpx.Client(base_url=_url(http_server)) as http:
        answer = http.post(
            "/v2/models/gru/infer", json={"id": "q1", "inputs": [_x(x)], "outputs": [{"name": "y"}]}
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"] == "q1" and body["model_name"] == "gru" and body["model_version"] == "1"
    (y,) = body["outputs"]
    assert y["name"] == "y" and y["datatype"] == "FP32" and y["shape"] == [2, 128]
    got = np.asarray(y["data"], np.float32).reshape(2, 128)
    for row in range(2):  # each item ran from the initial state
        np.testing.assert_allclose(got[row], ort_full("gru", x[row : row + 1])[0], atol=1e-5)


def test_a_sequence_by_its_parameters(http_server: RunningServer) -> None:
    x = sequence("gru", 6, seed=32)
    ys = []
    with httpx.Client(base_url=_url(http_server)) as http:
        for t in range(6):
            parameters = {"sequence_id": 7001, "sequence_start": t == 0, "sequence_end": t == 5}
            body = {"parameters": parameters, "inputs": [_x(x[t : t + 1])]}
            answer = http.post("/v2/models/gru/infer", json=body)
            assert answer.status_code == 200, answer.text
            ys.append(np.asarray(answer.json()["outputs"][0]["data"], np.float32))
        # Ended: the id is free; a request that does not start it again is refused.
        late = http.post(
            "/v2/models/gru/infer",
            json={"parameters": {"sequence_id": 7001}, "inputs": [_x(x[:1])]},
        )
    assert late.status_code == 400 and "sequence_start" in late.json()["error"]
    assert_matches_references("gru", x, np.stack(ys))


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ("not json", 400, "not JSON"),
        ({"inputs": []}, 400, "inputs must be a non-empty list"),
        ({"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32", "data": [0.0] * 15}]},
         400, "[-1, 16]"),
        ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 3}]},
         400, "holds 3 values"),
        ({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "BYTES", "data": ["a"] * 16}]},
         400, "'BYTES' is not supported"),
        ({"parameters": {"sequence_id": [1]}, "inputs": []}, 400, "sequence_id"),
    ],
)  # fmt: skip
def test_bad_requests_are_named(
    http_server: RunningServer, body: Any, status: int, words: str
) -> None:
    with httpx.Client(base_url=_url(http_server)) as http:
        if isinstance(body, str):
            answer = http.post("/v2/models/gru/infer", content=body)
        else:
            answer = http.post("/v2/models/gru/infer", json=body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]


def test_every_error_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert HTTP_STATUS[ErrorCode.NOT_FOUND] == 404 and HTTP_STATUS[ErrorCode.UNAVAILABLE] == 503


def test_the_model_repository_over_http(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    write_version(repo, "gru", 1, seed=101)
    server = make_server(
        model_repository=repo,
        model_control_mode="explicit",
        load_model=("gru",),
        http_port=free_port(),
    )
    x = inputs(3, seed=12)
    with httpx.Client(base_url=_url(server)) as http:
        write_version(repo, "gru", 2, seed=202)
        index = http.post("/v2/repository/index", json={}).json()
        assert index == [
            {"name": "gru", "version": "1", "state": "READY", "reason": ""},
            {"name": "gru", "version": "2", "state": "UNAVAILABLE", "reason": "not loaded"},
        ]
        assert http.post("/v2/repository/models/gru/load").status_code == 200
        ready = http.post("/v2/repository/index", json={"ready": True}).json()
        assert [(m["version"], m["state"]) for m in ready] == [("2", "READY")]
        for version, seed in (("1", None), ("2", 202)):
            answer = http.post(
                f"/v2/models/gru/versions/{version}/infer", json={"inputs": [_x(x[:1])]}
            )
            if seed is None:  # retired and drained at once (no session): not served
                assert answer.status_code == 404, answer.text
                assert "no ready version 1" in answer.json()["error"]
            else:
                got = np.asarray(answer.json()["outputs"][0]["data"], np.float32)
                np.testing.assert_allclose(got, reference(seed, x[:1])[0], atol=1e-5)
        refused = http.post("/v2/repository/models/gru/load", json={"parameters": {"config": "{}"}})
        assert refused.status_code == 400 and "not taken here" in refused.json()["error"]
        assert http.post("/v2/repository/models/gru/unload").status_code == 200
        gone = http.post("/v2/models/gru/infer", json={"inputs": [_x(x[:1])]})
        assert gone.status_code == 503 and "unloaded" in gone.json()["error"]


def test_the_same_principals_as_grpc(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(
        models=("gru",), http_port=free_port(), auth_tokens=("alice=a-token", "bob=b-token")
    )
    x = sequence("gru", 2, seed=33)
    with httpx.Client(base_url=_url(server)) as http:
        missing = http.get("/v2/models/gru")
        assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
        assert http.get("/v2/health/ready").status_code == 401  # no --readiness-without-auth
        wrong = http.get("/v2/models/gru", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid bearer token"

        def step(token: str, t: int, start: bool) -> np.ndarray:
            parameters = {"sequence_id": 9, "sequence_start": start}
            answer = http.post(
                "/v2/models/gru/infer",
                json={"parameters": parameters, "inputs": [_x(x[t : t + 1])]},
                headers={"authorization": f"Bearer {token}"},
            )
            assert answer.status_code == 200, answer.text
            return np.asarray(answer.json()["outputs"][0]["data"], np.float32)

        # Sequence 9 of alice and sequence 9 of bob are two sessions that never meet.
        alice = [step("a-token", 0, True)]
        bob = [step("b-token", 0, True)]
        alice.append(step("a-token", 1, False))
        bob.append(step("b-token", 1, False))
    assert_matches_references("gru", x, np.stack(alice))
    assert_matches_references("gru", x, np.stack(bob))
    owners = server.run(lambda: sorted(s.owner for s in server.engine._sessions.sessions()))
    assert owners == ["alice", "bob"]


def test_readiness_without_auth_opens_only_the_health_paths(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(
        models=("gru",), http_port=free_port(), auth_tokens=("t",), readiness_without_auth=True
    )
    with httpx.Client(base_url=_url(server)) as http:
        assert http.get("/v2/health/live").status_code == 200
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/v2").status_code == 401
        assert http.get("/v2/models/gru/ready").status_code == 401


def test_mutual_tls_names_the_principal_by_the_certificate(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    pki = Pki(tmp_path)
    server = make_server(
        models=("gru",),
        http_port=free_port(),
        tls_cert=str(pki.cert_path),
        tls_key=str(pki.key_path),
        tls_client_ca=str(pki.ca_path),
        tls_client_principal="cn",
    )
    cert, key = pki.client("carol").write(tmp_path, "carol")
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    context.load_cert_chain(cert, key)
    x = sequence("gru", 1, seed=34)
    url = f"https://127.0.0.1:{server.settings.http_port}"
    with httpx.Client(base_url=url, verify=context) as http:
        body = {"parameters": {"sequence_id": 5, "sequence_start": True}, "inputs": [_x(x)]}
        assert http.post("/v2/models/gru/infer", json=body).status_code == 200
    owners = server.run(lambda: [s.owner for s in server.engine._sessions.sessions()])
    assert owners == ["carol"]
    anonymous = ssl.create_default_context(cafile=str(pki.ca_path))  # no client certificate
    with httpx.Client(base_url=url, verify=anonymous) as http, pytest.raises(httpx.HTTPError):
        http.get("/v2/health/live")


def test_a_body_over_the_message_limit_is_refused_unread(
    make_server: Callable[..., RunningServer],
) -> None:
    server = make_server(models=("gru",), http_port=free_port(), max_message_bytes=4096)
    big = {"inputs": [_x(np.zeros((300, 16), np.float32))]}
    with httpx.Client(base_url=_url(server)) as http:
        answer = http.post("/v2/models/gru/infer", json=big)
        assert answer.status_code == 413 and "--max-message-bytes" in answer.json()["error"]
        small = http.post(
            "/v2/models/gru/infer", json={"inputs": [_x(np.zeros((1, 16), np.float32))]}
        )
        assert small.status_code == 200
