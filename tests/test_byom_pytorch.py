"""Bring your own model: PyTorch RNN, GRU and LSTM exports served without a config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rnnstream import Client
from tests.conftest import RunningServer, require_torch, test_settings

torch = require_torch()

from tests.torch_models import Recipe, Wrapped, build, export, run_full  # noqa: E402

RECIPES = [
    Recipe(kind, batch_first, layers)
    for kind in ("rnn", "gru", "lstm")
    for batch_first in (True, False)
    for layers in (1, 2)
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Wrapped]]:
    """Every recipe exported into one model repository, with no config.toml anywhere."""
    repository = tmp_path_factory.mktemp("byom")
    models = {}
    for n, recipe in enumerate(RECIPES):
        model = build(recipe, seed=n)
        export(model, repository / recipe.name / "model.onnx")
        models[recipe.name] = model
    return repository, models


@pytest.fixture(scope="module")
def byom_server(exported: tuple[Path, dict[str, Wrapped]]) -> Iterator[RunningServer]:
    running = RunningServer(test_settings(model_repository=exported[0]))
    yield running
    running.stop()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_streamed_outputs_equal_pytorch(
    recipe: Recipe,
    exported: tuple[Path, dict[str, Wrapped]],
    byom_server: RunningServer,
) -> None:
    model = exported[1][recipe.name]
    rng = np.random.default_rng(len(recipe.name) + recipe.layers)
    x = rng.standard_normal((9, recipe.features)).astype(np.float32)
    with Client(byom_server.target) as client:
        info = client.get_model(recipe.name)
        assert [s.input_name for s in info.states] == (
            ["h0", "c0"] if recipe.kind == "lstm" else ["h0"]
        )
        assert info.inputs[0].batch_axis == (0 if recipe.batch_first else 1)
        # Two sessions interleaved, so their frames share batches: one frame at a time and
        # then a 4-step frame, to cover T > 1 as well.
        a, b = client.open(recipe.name), client.open(recipe.name)
        got_a = [a.step(row)["y"] for row in x[:5]] + [a.step(x[5:])["y"]]
        got_b = [out["y"] for out in b.stream(x[::-1].copy(), inflight=4)]
        a.end()
        b.end()
    want_a = run_full(model, x)
    np.testing.assert_allclose(np.concatenate([np.stack(got_a[:5]), got_a[5]]), want_a, atol=1e-5)
    np.testing.assert_allclose(np.stack(got_b), run_full(model, x[::-1].copy()), atol=1e-5)


def test_every_export_is_detected_without_config(
    exported: tuple[Path, dict[str, Wrapped]], byom_server: RunningServer
) -> None:
    repository = exported[0]
    assert not list(repository.glob("*/config.toml"))
    assert byom_server.engine.model_names() == sorted(r.name for r in RECIPES)
