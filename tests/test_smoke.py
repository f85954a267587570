"""End-to-end smoke test: one gru session streamed through a live server."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from rnnstream import Client
from tests.conftest import MODELS, RunningServer


def test_gru_stream_matches_full_sequence(server: RunningServer) -> None:
    x = np.random.default_rng(1).standard_normal((30, 16)).astype(np.float32)
    with Client(server.target) as client:
        session = client.open("gru")
        ys = np.stack([out["y"] for out in session.stream(x, inflight=4)])
        session.end()
    ref = ort.InferenceSession(str(MODELS / "gru/model.onnx")).run(
        ["y"], {"x": x[:, None, :], "initial_h": np.zeros((1, 1, 128), np.float32)}
    )[0][:, 0]
    np.testing.assert_allclose(ys, ref, atol=1e-5)
