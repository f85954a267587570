"""Loading one model version: its ONNX Runtime session, timing and warm-up run in threads, so the
event loop, and every other model's batches, never wait for a load; the scheduler is made and
started on the loop."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._device_pool import state_pool
from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import InvalidArgument
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._models import ModelConfigError, ModelSpec
from rnnstream.server.core._repository import ModelSource, Stamp, version_stamp
from rnnstream.server.core._runtime import OrtModel, open_model
from rnnstream.server.core._scheduler import ModelScheduler
from rnnstream.server.core._serving import ServingConfig
from rnnstream.server.core._store import StateStore
from rnnstream.server.core._validation import FrameValidator
from rnnstream.server.core._work import BatchKey

__all__ = ["Served", "discover_models", "load_version", "output_bytes"]

log = logging.getLogger("rnnstream.models")

# Room for everything in an output message besides the tensor bytes (ids, names, shapes).
_MESSAGE_OVERHEAD = 1024
# Room a frame group's answer keeps per row for that row's error, should it fail (its session id
# and message are clipped to fit).
_GROUP_ROW_OVERHEAD = 384
_keys = itertools.count(1)


@dataclass(eq=False)
class Served:
    """One loaded copy of a model version: it serves the sessions opened on it until it is
    freed. A retired copy takes no new sessions; `retired` says why."""

    key: int  # sessions name their copy by it
    name: str
    version: int
    model: OrtModel
    scheduler: ModelScheduler
    validator: FrameValidator
    serving: ServingConfig
    stamp: tuple[Stamp | None, ...]  # the files it was loaded from, as they were
    executor: ThreadPoolExecutor
    retired: str = ""
    drain: asyncio.Task[None] | None = field(default=None, repr=False)

    def sessions(self) -> int:
        return self.scheduler.session_count()


def discover_models(repository: Path, only: Sequence[str] = ()) -> dict[str, Path]:
    """Model name -> folder, for every folder of the repository holding a model.onnx."""
    if not repository.is_dir():
        raise ModelConfigError(f"model repository {repository} is not a folder")
    found = {p.parent.name: p.parent for p in sorted(repository.glob("*/model.onnx"))}
    missing = [name for name in only if name not in found]
    if missing:
        raise ModelConfigError(f"models {missing} not found in {repository}; found {sorted(found)}")
    return {name: found[name] for name in (only or found)}


Feeds = dict[str, npt.NDArray[Any]]


def single_step_key(spec: ModelSpec) -> BatchKey | None:
    """The batching key of a single-step frame, or None where an input has another dynamic axis."""
    shapes = []
    for tensor in spec.inputs:
        shape = [1 if i == tensor.frame_time_axis else d for i, d in enumerate(tensor.frame_shape)]
        if any(d is None for d in shape):
            return None
        shapes.append(tuple(int(d) for d in shape if d is not None))
    return tuple(shapes)


def single_step_feeds(spec: ModelSpec, key: BatchKey, size: int) -> Feeds:
    """Zero inputs of `key`'s shapes and initial states, `size` sessions on the batch axis."""
    feeds: Feeds = {}
    for tensor, shape in zip(spec.inputs, key, strict=True):
        batched = list(shape)
        batched.insert(tensor.batch_axis, size)
        feeds[tensor.name] = np.zeros(batched, tensor.dtype)
    for state in spec.states:
        feeds[state.input_name] = np.stack([state.initial] * size, axis=state.batch_axis)
    return feeds


def _warm_up(model: OrtModel, sizes: Sequence[int]) -> None:
    """Run single-step batches of zeros at each size before the version takes sessions."""
    key = single_step_key(model.spec)
    if key is None:
        raise ModelConfigError(
            f"model {model.spec.name!r}: [serving] warmup needs inputs whose only dynamic axes "
            "are batch and time"
        )
    for size in sizes:
        model.run(single_step_feeds(model.spec, key, size))


async def load_version(
    source: ModelSource,
    version: int,
    settings: EngineSettings,
    metrics: CoreMetrics | None,
    store: StateStore | None,
) -> Served:
    """Load, time and warm up `version` of `source` off the loop; its scheduler runs once this
    returns. Raises what the load raised (ModelConfigError, DeviceError, ORT's own errors)."""
    name, serving = source.name, source.serving
    stamp = version_stamp(source, version)
    config, files = source.graph(version)
    path = source.versions[version]
    model = await asyncio.to_thread(open_model, name, path, config, files, serving)
    # One thread per loaded version: versions and models overlap (ORT releases the GIL).
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}-{version}")
    pool = await asyncio.to_thread(state_pool, model, settings.state_pool)
    scheduler = ModelScheduler(
        model,
        pool=pool,
        max_batch_size=serving.max_batch_size,
        executor=executor,
        metrics=metrics,
        store=store,
        # ORT's arena keeps the size of the largest batch it ran: batches stay small in bytes.
        max_batch_bytes=max(1, settings.max_buffered_bytes // 32),
    )
    loop = asyncio.get_running_loop()
    try:
        if serving.warmup:
            await loop.run_in_executor(executor, _warm_up, model, serving.warmup)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    validator = FrameValidator(
        model.spec,
        settings.max_steps_per_frame,
        functools.partial(_check_output_size, model.spec, settings.max_message_bytes),
    )
    scheduler.start()
    return Served(next(_keys), name, version, model, scheduler, validator, serving, stamp, executor)


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


def _check_output_size(
    spec: ModelSpec, limit: int, shapes: tuple[tuple[int, ...], ...], rows: int = 1
) -> int | None:
    # Refused before it runs: once applied, an output too big to send would be lost.
    size = output_bytes(spec, shapes)
    if size is None:
        return None
    if rows > 1 and size * rows + _GROUP_ROW_OVERHEAD * rows + _MESSAGE_OVERHEAD > limit:
        raise InvalidArgument(
            f"the frame group's outputs would take {size * rows} bytes, over the server's "
            f"message limit of {limit} bytes (--max-message-bytes); send fewer sessions or "
            "time steps per message"
        )
    if size + _MESSAGE_OVERHEAD > limit:
        raise InvalidArgument(
            f"the frame's outputs would take {size} bytes, over the server's message limit "
            f"of {limit} bytes (--max-message-bytes); send fewer time steps per frame"
        )
    return size
