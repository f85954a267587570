"""ONNX Runtime sessions: picking the execution provider and running a model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnxruntime as ort

from rnnstream.server.core._models import (
    GraphTensor,
    ModelConfigError,
    ModelSpec,
    build_spec,
    load_config,
)
from rnnstream.server.core._serving import ServingConfig, parse_device

__all__ = ["DeviceError", "OrtModel", "load_model", "open_model"]

log = logging.getLogger("rnnstream.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceError(Exception):
    """The requested device cannot be used on this machine."""


class OrtModel:
    """One loaded model: its spec and the ORT session that runs it (thread-safe)."""

    def __init__(self, spec: ModelSpec, session: ort.InferenceSession) -> None:
        self.spec = spec
        self.session = session
        # Read back from ORT rather than assumed: this is what really runs the graph.
        self.provider: str = session.get_providers()[0]
        self._output_names = [o.name for o in spec.outputs] + [s.output_name for s in spec.states]

    def run(
        self, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> tuple[list[npt.NDArray[Any]], list[npt.NDArray[Any]]]:
        """Run one batch; returns (data outputs, new states) in spec order."""
        results: list[npt.NDArray[Any]] = self.session.run(self._output_names, dict(feeds))
        n = len(self.spec.outputs)
        return results[:n], results[n:]


_GRAPH_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _session_options(serving: ServingConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = serving.intra_op_threads
    options.inter_op_num_threads = serving.inter_op_threads
    options.graph_optimization_level = _GRAPH_LEVELS[serving.graph_optimization]
    options.log_severity_level = 3
    return options


def _create(path: Path, providers: list[Any], serving: ServingConfig) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), sess_options=_session_options(serving), providers=providers
    )


def _model_problem(exc: Exception) -> bool:
    """ORT refused the file itself (not the device): corrupt, not a model, an unsupported graph."""
    return type(exc).__name__ in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NoModel")


def _open_session(path: Path, serving: ServingConfig) -> ort.InferenceSession:
    available = ort.get_available_providers()
    device, device_id = parse_device(serving.device)
    flag = f"--device {serving.device}"
    if device == "cpu":
        return _create(path, [CPU], serving)
    if CUDA not in available:
        if device == "cuda":
            raise DeviceError(
                f"{flag}: the installed onnxruntime offers only {available}. Install the "
                "GPU build (pip install 'rnnstream[cuda]', which brings onnxruntime-gpu, and "
                "uninstall onnxruntime) on a machine with an NVIDIA driver and the CUDA and cuDNN "
                "libraries that onnxruntime-gpu release needs (pip install "
                "'onnxruntime-gpu[cuda,cudnn]'), or use --device cpu / auto"
            )
        return _create(path, [CPU], serving)
    cuda: Any = CUDA if device_id is None else (CUDA, {"device_id": device_id})
    try:
        session = _create(path, [cuda, CPU], serving)
    except Exception as exc:  # ORT raises plain exceptions when CUDA libraries are missing
        if _model_problem(exc):
            raise
        if device == "cuda":
            raise DeviceError(f"{flag}: could not create a CUDA session: {exc}") from exc
        log.warning("CUDA provider is listed but unusable (%s); using the CPU", exc)
        return _create(path, [CPU], serving)
    if session.get_providers()[0] != CUDA:
        if device == "cuda":
            raise DeviceError(
                f"{flag}: onnxruntime fell back to the CPU; check the NVIDIA driver and "
                "the CUDA/cuDNN libraries onnxruntime-gpu needs"
            )
        log.warning("CUDA provider could not run %s; using the CPU", path)
    return session


def _graph_tensors(args: list[Any]) -> list[GraphTensor]:
    return [GraphTensor(a.name, a.type, tuple(a.shape)) for a in args]


def open_model(
    name: str,
    path: Path,
    config: Mapping[str, Any] | None,
    files: Path,
    serving: ServingConfig,
) -> OrtModel:
    """An ORT session of the graph at `path`, described by `config` (names relative to `files`)."""
    if not path.exists():
        raise ModelConfigError(f"model {name!r}: {path} does not exist")
    try:
        session = _open_session(path, serving)
    except DeviceError:
        raise
    except Exception as exc:  # ORT's own errors: the file is not a model it can run
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelConfigError(
            f"model {name!r}: ONNX Runtime cannot load {path}: {reason}"
        ) from exc
    spec = build_spec(
        name,
        path,
        _graph_tensors(session.get_inputs()),
        _graph_tensors(session.get_outputs()),
        config,
        files,
    )
    model = OrtModel(spec, session)
    log.info(
        "loaded model %s from %s on %s: inputs %s, outputs %s, states %s",
        name,
        path,
        model.provider,
        [t.name for t in spec.inputs],
        [t.name for t in spec.outputs],
        [f"{s.input_name}->{s.output_name}" for s in spec.states],
    )
    return model


def load_model(name: str, folder: Path, device: str, threads: int) -> OrtModel:
    """Load models/NAME: its ONNX graph, optional config.toml, and an ORT session."""
    serving = ServingConfig(1, threads, 1, "all", device, (), 0.0)
    return open_model(name, folder / "model.onnx", load_config(folder), folder, serving)
