"""Which models are served and how: repository, control mode, versions, execution provider."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rnnstream.server._flags import Rule
from rnnstream.server._settings._field import setting

__all__ = ["ModelSettings"]


@dataclass(frozen=True)
class ModelSettings:
    """Models: the repository, which models and versions serve, and how they run."""

    model_repository: Path = field(
        default=Path("models"),
        metadata={
            "doc": "Folder with one sub-folder per model holding model.onnx.",
            "rule": Rule(
                path="dir",
                unless="example_models",
                hint="give the folder of your models, or serve the examples: --example-models",
            ),
        },
    )
    example_models: bool = setting(
        False,
        "Serve the small example models shipped with rnnstream (gru, lstm, rnn_tanh, rnn_relu, "
        "co2_forecaster, seq_classifier) instead of a --model-repository: a first request "
        "needs no model of your own.",
    )
    models: tuple[str, ...] = setting(
        (), "Load only these models (comma-separated); empty loads every model found."
    )
    model_control_mode: str = setting(
        "none",
        "How served models follow the repository (Triton's names): none loads every model at "
        "start; poll also rescans it every --repository-poll-secs (new, changed and removed "
        "models); explicit loads only --load-model at start, then what clients load and unload. "
        "SIGHUP rescans in every mode.",
        choices=("none", "poll", "explicit"),
    )
    repository_poll_secs: float = setting(
        15.0,
        "Poll mode: seconds between rescans; a model loads once its files hold still.",
        above=0,
    )
    load_model: tuple[str, ...] = setting(
        (), "With --model-control-mode explicit, models to load at start (comma-separated; *: all)."
    )
    drain_timeout: float = setting(
        600.0,
        "Seconds a retired model version (unloaded, or replaced by a newer one) keeps serving "
        "the sessions opened on it; then they are ended, each told why. 0: until they end.",
        minimum=0,
    )
    bad_models: str = setting(
        "refuse",
        "A model that cannot be loaded (a corrupt model.onnx, a graph rnnstream cannot serve): "
        "refuse to start, naming it; or skip it with an error logged and serve the others.",
        choices=("refuse", "skip"),
    )
    device: str = setting(
        "auto",
        "Execution provider: auto (CUDA if it really works, else CPU), cpu or cuda.",
        choices=("auto", "cpu", "cuda"),
    )
    state_pool: str = setting(
        "auto",
        "Where session states live between batches: on the GPU when a model runs on CUDA "
        "(auto), in host memory, or as ONNX Runtime values on the model's device (device).",
        choices=("auto", "host", "device"),
    )
    ort_threads: int = setting(
        1, "ONNX Runtime intra-op threads per model; 0 lets ORT decide.", minimum=0, maximum=1024
    )
