"""`rnnstream-server --example-models` serves the example models shipped with rnnstream, from a
folder that holds no models/ (the installed wheel's case; test_wheel runs the wheel itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rnnstream import AsyncClient
from tests.conftest import MODELS
from tests.server_process import ServerProcess
from tests.streaming import assert_matches_references, sequence


async def test_example_models_answer_from_a_folder_without_models(tmp_path: Path) -> None:
    assert not (tmp_path / "models").exists()
    server = ServerProcess("--example-models", cwd=tmp_path, repository=None)
    try:
        async with AsyncClient(server.target) as client:
            listed = sorted(m.name for m in await client.list_models())
            session = await client.open("gru")
            x = sequence("gru", 6, seed=500)
            ys = [(await session.step(row))["y"] for row in x]
            await session.end()
    finally:
        server.close()
    shipped = sorted(p.parent.name for p in MODELS.glob("*/model.onnx"))
    assert listed == shipped and "co2_forecaster" in listed
    assert_matches_references("gru", x, np.stack(ys))


def test_example_models_or_a_repository_not_both(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rnnstream.server", "--example-models",
         "--model-repository", str(MODELS)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "rnnstream-server: --example-models (RNNSTREAM_EXAMPLE_MODELS): serves the example "
        f"models, not {str(MODELS)!r}: give --example-models or --model-repository, not both\n"
    )


def test_without_the_flag_a_folder_without_models_is_refused(tmp_path: Path) -> None:
    """No silent fallback to the examples: the missing repository is named."""
    result = subprocess.run(
        [sys.executable, "-m", "rnnstream.server"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "rnnstream-server: --model-repository (RNNSTREAM_MODEL_REPOSITORY): 'models' does not "
        "exist; give the folder of your models, or serve the examples: --example-models\n"
    )
