"""How a served model looks to Open Inference Protocol clients: metadata, config, statistics."""

from __future__ import annotations

import numpy as np

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import model_config_pb2 as mc
from rnnstream.server._settings import Settings
from rnnstream.server.core import (
    MAX_GATHER_SECONDS,
    ModelInfo,
    ModelStats,
    NotFound,
    ServingConfig,
    StateSpec,
    TensorSpec,
    VersionPolicy,
    quoted,
)
from rnnstream.server.transport.grpc._oip_codec import CONFIG_TYPES, DATATYPES, oip_dims

__all__ = [
    "PLATFORM",
    "model_config",
    "model_metadata",
    "model_statistics",
    "parse_version",
    "ready_versions",
]

PLATFORM = "onnxruntime_onnx"
# ONNX Runtime's graph optimization levels as Triton's onnxruntime backend numbers them.
_GRAPH_LEVEL = {"basic": -1, "extended": 1, "disabled": 2, "all": 0}


def parse_version(text: str) -> int | None:
    """An OIP model_version: "" is the newest ready version, else a positive integer."""
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise NotFound(f"no version {quoted(text)}: versions are positive integers")
    return int(text)


def ready_versions(model: ModelInfo) -> list[str]:
    return [str(v.version) for v in model.versions if v.state == "READY"]


def _metadata(spec: TensorSpec) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=DATATYPES[spec.dtype], shape=[-1, *oip_dims(spec)]
    )


def model_metadata(model: ModelInfo) -> oip.ModelMetadataResponse:
    """Inputs and outputs with the batch axis first; states are implicit and not listed."""
    spec = model.spec
    return oip.ModelMetadataResponse(
        name=spec.name,
        versions=ready_versions(model),
        platform=PLATFORM,
        inputs=[_metadata(t) for t in spec.inputs],
        outputs=[_metadata(t) for t in spec.outputs],
    )


def _state(state_spec: StateSpec) -> mc.ModelSequenceBatching.State:
    dims = [
        -1 if d is None else d for i, d in enumerate(state_spec.shape) if i != state_spec.batch_axis
    ]
    initial = mc.ModelSequenceBatching.InitialState(
        name=f"{state_spec.input_name}_initial",
        data_type=CONFIG_TYPES[state_spec.dtype],
        dims=list(state_spec.initial.shape),
    )
    if np.any(state_spec.initial):
        initial.data_file = "config.toml"  # the model's configured initial value
    else:
        initial.zero_data = True
    return mc.ModelSequenceBatching.State(
        input_name=state_spec.input_name,
        output_name=state_spec.output_name,
        data_type=CONFIG_TYPES[state_spec.dtype],
        dims=dims,
        initial_state=[initial],
    )


def _policy(policy: VersionPolicy | None) -> mc.ModelVersionPolicy:
    if policy is None or policy.kind == "latest":
        latest = policy.latest if policy is not None else 1
        return mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=latest))
    if policy.kind == "all":
        return mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    specific = mc.ModelVersionPolicy.Specific(versions=list(policy.versions))
    return mc.ModelVersionPolicy(specific=specific)


def _instance_group(model: ModelInfo, serving: ServingConfig) -> mc.ModelInstanceGroup:
    """One instance: each model version runs one batch at a time, on the device it really runs."""
    if not model.provider.startswith("CUDA"):
        return mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _, _, index = serving.device.partition(":")
    return mc.ModelInstanceGroup(
        kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=[int(index or 0)]
    )


def model_config(model: ModelInfo, settings: Settings) -> mc.ModelConfig:
    """A sequence-batched model whose recurrent state is implicit, batched oldest-first, with
    the values in force for this version ([serving] in config.toml, else the server's flags)."""
    spec = model.spec
    serving = model.serving or ServingConfig(
        model.max_batch_size, settings.ort_threads, 1, "all", settings.device, (),
        settings.session_ttl,
    )  # fmt: skip
    threads = {
        "intra_op_thread_count": serving.intra_op_threads,
        "inter_op_thread_count": serving.inter_op_threads,
    }
    return mc.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend="onnxruntime",
        version_policy=_policy(model.policy),
        max_batch_size=max(1, model.max_batch_size),
        input=[
            mc.ModelInput(name=t.name, data_type=CONFIG_TYPES[t.dtype], dims=oip_dims(t))
            for t in spec.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=CONFIG_TYPES[t.dtype], dims=oip_dims(t))
            for t in spec.outputs
        ],
        instance_group=[_instance_group(model, serving)],
        optimization=mc.ModelOptimizationPolicy(
            graph=mc.ModelOptimizationPolicy.Graph(level=_GRAPH_LEVEL[serving.graph_optimization])
        ),
        parameters={k: mc.ModelParameter(string_value=str(v)) for k, v in threads.items()},
        model_warmup=[
            mc.ModelWarmup(name=f"batch_{size}", batch_size=size, count=1)
            for size in serving.warmup
        ],
        sequence_batching=mc.ModelSequenceBatching(
            oldest=mc.ModelSequenceBatching.StrategyOldest(
                max_candidate_sequences=min(settings.max_sessions, 2**31 - 1),
                # The longest a batch that could start waits for frames arriving.
                max_queue_delay_microseconds=round(MAX_GATHER_SECONDS * 1e6),
            ),
            max_sequence_idle_microseconds=int(serving.session_ttl * 1_000_000),
            state=[_state(s) for s in spec.states],
        ),
    )


def _duration(count: int, seconds: float) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=count, ns=int(seconds * 1e9))


def model_statistics(name: str, version: int, stats: ModelStats) -> oip.ModelStatistics:
    """Counts and cumulative times since start, per frame (inference) and per batch (execution)."""
    return oip.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=int(stats.last_batch_unix * 1000),
        inference_count=stats.frames,
        execution_count=stats.batches,
        inference_stats=oip.InferStatistics(
            success=_duration(stats.frames, stats.queue_seconds + stats.frame_run_seconds),
            fail=_duration(stats.failed_frames, 0.0),
            queue=_duration(stats.frames, stats.queue_seconds),
            compute_input=_duration(stats.frames, 0.0),
            compute_infer=_duration(stats.frames, stats.frame_run_seconds),
            compute_output=_duration(stats.frames, 0.0),
        ),
        batch_stats=[
            oip.InferBatchStatistics(
                batch_size=size,
                compute_infer=_duration(count, seconds),
            )
            for size, (count, seconds) in sorted(stats.by_size.items())
        ],
    )
