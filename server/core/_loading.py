"""Loading the served models: finding them, a started scheduler per model, and the checks each
model's frames get before they are queued."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import InvalidArgument
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._models import ModelConfigError, ModelSpec
from rnnstream.server.core._runtime import OrtModel, load_model
from rnnstream.server.core._scheduler import ModelScheduler
from rnnstream.server.core._store import StateStore
from rnnstream.server.core._validation import FrameValidator

__all__ = ["discover_models", "load_models", "output_bytes", "start_model"]

log = logging.getLogger("rnnstream.engine")

# Room for everything in an output message besides the tensor bytes (ids, names, shapes).
_MESSAGE_OVERHEAD = 1024


def discover_models(repository: Path, only: Sequence[str] = ()) -> dict[str, Path]:
    """Model name -> folder, for every folder of the repository holding a model.onnx."""
    if not repository.is_dir():
        raise ModelConfigError(f"model repository {repository} is not a folder")
    found = {p.parent.name: p.parent for p in sorted(repository.glob("*/model.onnx"))}
    missing = [name for name in only if name not in found]
    if missing:
        raise ModelConfigError(f"models {missing} not found in {repository}; found {sorted(found)}")
    return {name: found[name] for name in (only or found)}


def load_models(settings: EngineSettings) -> dict[str, OrtModel]:
    """Every model of the repository (or those named). One that cannot be loaded stops the
    start, unless settings.skip_bad_models: then it is left out, with an error logged."""
    folders = discover_models(settings.model_repository, settings.models)
    if not folders:
        raise ModelConfigError(f"no */model.onnx under {settings.model_repository}")
    models: dict[str, OrtModel] = {}
    for name, folder in folders.items():
        try:
            models[name] = load_model(name, folder, settings.device, settings.ort_threads)
        except ModelConfigError as exc:
            if not settings.skip_bad_models:
                raise ModelConfigError(
                    f"{exc} (to serve the other models without it: --bad-models skip)"
                ) from exc
            log.error("skipping model %s: %s", name, exc)
    if not models:
        raise ModelConfigError(f"no model under {settings.model_repository} could be loaded")
    return models


def start_model(
    model: OrtModel,
    settings: EngineSettings,
    executor: Executor,
    metrics: CoreMetrics | None,
    store: StateStore | None,
) -> tuple[ModelScheduler, FrameValidator]:
    """The model's scheduler, timed and running, and the validator of its frames."""
    scheduler = ModelScheduler(
        model,
        max_batch_size=settings.max_batch_size,
        executor=executor,
        metrics=metrics,
        inline_run_seconds=settings.inline_run_seconds,
        busy_poll_seconds=settings.busy_poll_seconds,
        gather_seconds=settings.gather_seconds,
        store=store,
    )
    timed = scheduler.calibrate()
    if timed:
        runs = ", ".join(f"{size}: {seconds * 1e6:.0f}" for size, seconds in timed)
        log.info("model %s: ORT µs per single-step batch, by size: %s", model.spec.name, runs)
    scheduler.start()
    validator = FrameValidator(
        model.spec,
        settings.max_steps_per_frame,
        functools.partial(_check_output_size, model.spec, settings.max_message_bytes),
    )
    return scheduler, validator


def output_bytes(spec: ModelSpec, shapes: Sequence[tuple[int, ...]]) -> int | None:
    """Bytes of one frame's outputs, given its input shapes, when they fix them; else None."""
    steps = next(
        (
            shape[t.frame_time_axis]
            for t, shape in zip(spec.inputs, shapes, strict=True)
            if t.frame_time_axis is not None
        ),
        None,
    )
    total = 0
    for out in spec.outputs:
        dims = [steps if i == out.frame_time_axis else d for i, d in enumerate(out.frame_shape)]
        known = [d for d in dims if d is not None]
        if len(known) != len(dims):
            return None
        total += math.prod(known) * out.dtype.itemsize
    return total


def _check_output_size(spec: ModelSpec, limit: int, shapes: tuple[tuple[int, ...], ...]) -> None:
    # Refused before it runs: once applied, an output too big to send would be lost.
    size = output_bytes(spec, shapes)
    if size is not None and size + _MESSAGE_OVERHEAD > limit:
        raise InvalidArgument(
            f"the frame's outputs would take {size} bytes, over the server's message limit "
            f"of {limit} bytes (--max-message-bytes); send fewer time steps per frame"
        )
