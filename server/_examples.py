"""Where the example models are: shipped in the wheel beside the server package, or, in a
checkout, the repository's models/ folder."""

from __future__ import annotations

from pathlib import Path

__all__ = ["example_models"]


def example_models() -> Path:
    """The folder of example models (one sub-folder per model, each with its model.onnx)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "examples", here.parent / "models"):
        if any(folder.glob("*/model.onnx")):
            return folder
    raise FileNotFoundError(
        f"this installation holds no example models (looked in {here / 'examples'}); "
        "reinstall rnnstream, or serve a folder of your own with --model-repository"
    )
