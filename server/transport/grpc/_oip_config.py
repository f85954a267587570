"""How a served model looks to Open Inference Protocol clients: metadata, config, statistics."""

from __future__ import annotations

import numpy as np

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import model_config_pb2 as mc
from rnnstream.server._settings import Settings
from rnnstream.server.core import ModelInfo, ModelStats, StateSpec, TensorSpec
from rnnstream.server.transport.grpc._oip_codec import CONFIG_TYPES, DATATYPES, oip_dims

__all__ = ["PLATFORM", "VERSION", "model_config", "model_metadata", "model_statistics"]

PLATFORM = "onnxruntime_onnx"
VERSION = "1"  # each model has one version: the model.onnx in its folder


def _metadata(spec: TensorSpec) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=DATATYPES[spec.dtype], shape=[-1, *oip_dims(spec)]
    )


def model_metadata(model: ModelInfo) -> oip.ModelMetadataResponse:
    """Inputs and outputs with the batch axis first; states are implicit and not listed."""
    spec = model.spec
    return oip.ModelMetadataResponse(
        name=spec.name,
        versions=[VERSION],
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


def model_config(model: ModelInfo, settings: Settings) -> mc.ModelConfig:
    """A sequence-batched model whose recurrent state is implicit, batched oldest-first."""
    spec = model.spec
    return mc.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=max(1, model.max_batch_size),
        input=[
            mc.ModelInput(name=t.name, data_type=CONFIG_TYPES[t.dtype], dims=oip_dims(t))
            for t in spec.inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=CONFIG_TYPES[t.dtype], dims=oip_dims(t))
            for t in spec.outputs
        ],
        instance_group=[
            mc.ModelInstanceGroup(
                kind=mc.ModelInstanceGroup.KIND_GPU
                if model.provider.startswith("CUDA")
                else mc.ModelInstanceGroup.KIND_CPU,
                count=1,
            )
        ],
        sequence_batching=mc.ModelSequenceBatching(
            oldest=mc.ModelSequenceBatching.StrategyOldest(
                max_candidate_sequences=min(settings.max_sessions, 2**31 - 1),
                max_queue_delay_microseconds=0,  # no batching window: see the scheduler
            ),
            max_sequence_idle_microseconds=int(settings.session_ttl * 1_000_000),
            state=[_state(s) for s in spec.states],
        ),
    )


def _duration(count: int, seconds: float) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=count, ns=int(seconds * 1e9))


def model_statistics(name: str, stats: ModelStats) -> oip.ModelStatistics:
    """Counts and cumulative times since start, per frame (inference) and per batch (execution)."""
    return oip.ModelStatistics(
        name=name,
        version=VERSION,
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
