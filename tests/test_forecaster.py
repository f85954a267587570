"""The shipped co2_forecaster served live: parity with PyTorch, and the model card's figures."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from rnnstream import Client
from tests.conftest import MODELS, RunningServer, require_torch

FOLDER = MODELS / "co2_forecaster"


def _train_module() -> ModuleType:
    require_torch()
    name = "co2_forecaster_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FOLDER / "train.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _co2_series() -> npt.NDArray[np.float32]:
    """The weekly series as the training script prepares it (gaps interpolated in time)."""
    datasets = pytest.importorskip("statsmodels.datasets")
    frame = datasets.co2.load_pandas().data
    return frame["co2"].interpolate(method="time").bfill().to_numpy(dtype=np.float32)


def assert_close(got: npt.NDArray[Any], want: npt.NDArray[Any], atol: float = 1e-5) -> None:
    """Within `atol`, or within one float32 step of the value: near 320 ppm float32 values are
    3.05e-5 apart, so two correct float32 computations can differ by that much."""
    want32 = np.asarray(want, np.float32)
    limit = np.maximum(atol, np.spacing(np.abs(want32)))
    error = np.abs(np.asarray(got, np.float64) - want32.astype(np.float64))
    assert (error <= limit).all(), f"max error {error.max():.3g} at {int(error.argmax())}"


def _stream_all(target: str, series: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with Client(target) as client:
        session = client.open("co2_forecaster")
        ys = np.stack([out["y"] for out in session.stream(series[:, None], inflight=32)])
        session.end()
    return ys[:, 0]


def test_streamed_outputs_equal_pytorch(server: RunningServer) -> None:
    torch = require_torch()
    train = _train_module()
    series = _co2_series()[:600]
    served = _stream_all(server.target, series)
    model = train.module_from_weights(FOLDER / "weights.npz")
    with torch.no_grad():
        y, h = model(torch.from_numpy(series).view(1, -1, 1), torch.zeros(1, 1, 32))
    assert_close(served, y.view(-1).numpy())

    # A 10-week forecast: PyTorch fed its own predictions back, one step per call.
    with Client(server.target) as client:
        session = client.open("co2_forecaster")
        for _ in session.stream(series[:, None], inflight=32):
            pass
        forecast = session.forecast(10)["y"][:, 0]
        session.end()
    want, current = [], y[:, -1:]
    with torch.no_grad():
        for _ in range(10):
            current, h = model(current, h)
            want.append(float(current))
    assert_close(forecast, np.array(want, np.float32), atol=1e-4)


def _card_figure(card: str, row: str) -> tuple[float, float]:
    match = re.search(rf"\|\s*\**{row}\**\s*\|\s*\**([0-9.]+)\**\s*\|\s*\**([0-9.]+)\**\s*\|", card)
    assert match is not None, f"model card has no {row!r} row"
    return float(match.group(1)), float(match.group(2))


def test_served_model_beats_persistence_as_its_card_says(server: RunningServer) -> None:
    """Recompute the card's held-out MAE from the server's outputs; it must beat persistence."""
    series = _co2_series()
    served = _stream_all(server.target, series)
    n = len(series)
    test_start = int(n * 0.7) + int(n * 0.1)
    targets = series[test_start:]
    model_mae = float(np.abs(served[test_start - 1 : n - 1] - targets).mean())
    persistence_mae = float(np.abs(series[test_start - 1 : n - 1] - targets).mean())
    assert model_mae < persistence_mae
    card = (FOLDER / "MODEL_CARD.md").read_text()
    card_model, card_persistence = _card_figure(card, "held-out test tail")
    assert card_model == pytest.approx(model_mae, abs=1e-3)
    assert card_persistence == pytest.approx(persistence_mae, abs=1e-4)


def test_training_script_runs_and_exports_a_servable_model(
    tmp_path: Path, make_server: Any
) -> None:
    """A short run of the real script: it trains, exports, and the export serves as trained."""
    torch = require_torch()
    train = _train_module()
    cfg = train.TrainConfig(iterations=20, eval_every=10, hidden=8, batch=8)
    series = _co2_series()
    model, report = train.train(cfg, series)
    assert report["best_iteration"] in (10, 20)
    (tmp_path / "co2_small").mkdir()
    train.export_onnx(model, tmp_path / "co2_small" / "model.onnx")
    running = make_server(model_repository=tmp_path)
    with Client(running.target) as client:
        session = client.open("co2_small")
        x = series[:30, None]
        served = np.stack([o["y"] for o in session.stream(x)])[:, 0]
        session.end()
    with torch.no_grad():
        y, _ = model(torch.from_numpy(x).view(1, -1, 1), torch.zeros(1, 1, 8))
    assert_close(served, y.view(-1).numpy())
