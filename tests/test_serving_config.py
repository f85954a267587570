"""Per-model [serving] in config.toml: what ONNX Runtime and the scheduler really run with, and
what OIP ModelConfig reports; the server's flags are the defaults."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests import probe
from tests.conftest import RunningServer
from tests.streaming import RawStream, frame_request, x_tensor
from tests.versions import inputs, write_version

SERVING = """\
[serving]
max_batch_size = 4
intra_op_threads = 2
inter_op_threads = 1
graph_optimization = "basic"
warmup = [1, 4]
session_ttl = 0.5
"""


@pytest.fixture
def server(make_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    repo = tmp_path / "models"
    write_version(repo, "tuned", None, seed=1)
    (repo / "tuned" / "config.toml").write_text(SERVING)
    write_version(repo, "plain", None, seed=2)
    return make_server(model_repository=repo, ort_threads=1, max_batch_size=256, session_ttl=0)


def _config(server: RunningServer, name: str) -> oip.ModelConfigResponse:
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelConfig(oip.ModelConfigRequest(name=name), timeout=10)


def test_model_config_reports_the_values_in_force(server: RunningServer) -> None:
    tuned = _config(server, "tuned").config
    assert tuned.max_batch_size == 4
    assert {k: v.string_value for k, v in tuned.parameters.items()} == {
        "intra_op_thread_count": "2",
        "inter_op_thread_count": "1",
    }
    assert tuned.optimization.graph.level == -1  # Triton's onnxruntime backend: -1 is basic
    assert [(w.batch_size, w.count) for w in tuned.model_warmup] == [(1, 1), (4, 1)]
    assert tuned.sequence_batching.max_sequence_idle_microseconds == 500_000
    plain = _config(server, "plain").config
    assert plain.max_batch_size == 256 and plain.optimization.graph.level == 0
    assert plain.parameters["intra_op_thread_count"].string_value == "1"
    assert plain.sequence_batching.max_sequence_idle_microseconds == 0
    assert not plain.model_warmup
    # ...and they are what ONNX Runtime runs with.
    options = server.run(lambda: probe.session_options(server.engine, "tuned"))
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


async def test_batches_keep_to_the_models_own_max_batch_size(server: RunningServer) -> None:
    x = inputs(1, seed=5)
    async with RawStream(server.target) as raw:
        opened = [await raw.open("tuned") for _ in range(12)]
        for o in opened:  # all queued before any is answered: they batch
            await raw.call.write(frame_request(o.session_id, 0, x_tensor(x)))
        answers = [await raw.call.read() for _ in opened]
    assert {a.WhichOneof("kind") for a in answers} == {"output"}
    stats = server.run(lambda: server.engine.model_stats("tuned"))
    assert stats.frames >= 12 and max(stats.by_size) <= 4


async def test_each_model_expires_sessions_after_its_own_ttl(server: RunningServer) -> None:
    x = inputs(1, seed=6)
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        async with RawStream(server.target) as raw:
            tuned = await raw.open("tuned")
            plain = await raw.open("plain")
            await raw.frame(tuned.session_id, 0, x)
            info = await native.GetSession(pb.GetSessionRequest(session_id=tuned.session_id))
            assert 0 < info.expires_in_seconds <= 0.5
            notice = await asyncio.wait_for(raw.call.read(), 30)  # the stream is told
            assert notice.WhichOneof("kind") == "ended" and notice.ended.reason == "expired"
            assert notice.ended.session_id == tuned.session_id
            late = await raw.error(frame_request(tuned.session_id, 1, x_tensor(x)))
            assert late.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert "expired after 0.5 s idle" in late.message
            assert await raw.frame(plain.session_id, 0, x) is not None  # ttl 0: never


async def test_a_bad_serving_value_is_named(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    write_version(repo, "odd", None, seed=3)
    (repo / "odd" / "config.toml").write_text('[serving]\ngraph_optimization = "max"\n')
    server = make_server(model_repository=repo, model_control_mode="explicit")
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await native.LoadModel(pb.LoadModelRequest(name="odd"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "[serving] graph_optimization must be one of" in (refused.value.details() or "")
        listed = await native.ListRepository(pb.ListRepositoryRequest())
        (entry,) = [v for v in listed.versions if v.model == "odd"]
        assert entry.state == "UNAVAILABLE" and "graph_optimization" in entry.reason
