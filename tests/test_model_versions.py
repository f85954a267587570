"""Model versions over the native API: sessions pinned to the version they opened on while
versions are loaded, replaced and unloaded; a bad version leaves the good one serving."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from rnnstream import AsyncClient
from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from rnnstream.server.stores import RedisStore
from tests import probe
from tests.conftest import RunningServer
from tests.services import RedisServer
from tests.streaming import RawStream, x_tensor
from tests.versions import inputs, reference, write_corrupt, write_version

MODEL = "gru"
ATOL = 1e-5


def _index(server: RunningServer) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(model, version) -> [(state, reason), ...] from the repository index."""
    found: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for entry in server.run(lambda: server.engine.repository_index()):
        found.setdefault((entry.model, entry.version), []).append((entry.state, entry.reason))
    return found


async def _stream(raw: RawStream, sid: str, x: np.ndarray, start: int = 0) -> list[np.ndarray]:
    return [await raw.frame(sid, start + t, x[t : t + 1]) for t in range(len(x))]


async def _open(raw: RawStream, version: int = 0) -> pb.SessionOpened:
    response = await raw.request(
        pb.StreamRequest(open=pb.OpenSession(model=MODEL, model_version=version))
    )
    assert response.WhichOneof("kind") == "opened", response
    return response.opened


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_version(root, MODEL, 1, seed=101)
    return root


def _explicit(make_server: Callable[..., RunningServer], repo: Path, **extra: Any) -> RunningServer:
    return make_server(
        model_repository=repo, model_control_mode="explicit", load_model=(MODEL,), **extra
    )


async def test_a_reload_leaves_live_sessions_on_their_version(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    server = _explicit(make_server, repo)
    x = inputs(12, seed=5)
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        async with RawStream(server.target) as raw:
            old = [await _open(raw) for _ in range(5)]
            assert {o.model_version for o in old} == {1}
            before = {o.session_id: await _stream(raw, o.session_id, x[:6]) for o in old}
            write_version(repo, MODEL, 2, seed=202)
            loaded = await native.LoadModel(pb.LoadModelRequest(name=MODEL))
            states = {(v.version, v.state) for v in loaded.versions}
            assert (2, "READY") in states and (1, "UNLOADING") in states
            new = await _open(raw)
            assert new.model_version == 2
            after = {o.session_id: await _stream(raw, o.session_id, x[6:], 6) for o in old}
            fresh = await _stream(raw, new.session_id, x)
            for sid in before:
                got = np.concatenate(before[sid] + after[sid])
                np.testing.assert_allclose(got, reference(101, x), rtol=0, atol=ATOL)
            np.testing.assert_allclose(np.concatenate(fresh), reference(202, x), rtol=0, atol=ATOL)
            assert not np.allclose(reference(101, x), reference(202, x), atol=1e-3)
            # A version can be asked for by number while it serves: not v1, now retired.
            refused = await raw.error(
                pb.StreamRequest(open=pb.OpenSession(model=MODEL, model_version=1))
            )
            assert refused.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert (
                "no ready version 1" in refused.message
                and "replaced by version 2" in refused.message
            )
            assert _index(server)[(MODEL, 1)] == [
                ("UNLOADING", "replaced by version 2; draining, 5 sessions left")
            ]
            for o in old[:-1]:
                await raw.request(
                    pb.StreamRequest(end=pb.EndSessionRequest(session_id=o.session_id))
                )
            assert server.run(lambda: probe.loaded_versions(server.engine, MODEL)) == [1, 2]
            await raw.request(
                pb.StreamRequest(end=pb.EndSessionRequest(session_id=old[-1].session_id))
            )
            # The last session on v1 ended: v1 is freed.
            for _ in range(200):
                if server.run(lambda: probe.loaded_versions(server.engine, MODEL)) == [2]:
                    break
                await asyncio.sleep(0.02)
            assert server.run(lambda: probe.loaded_versions(server.engine, MODEL)) == [2]
            assert _index(server)[(MODEL, 1)] == [("UNAVAILABLE", "replaced by version 2")]
            info = await native.GetModel(pb.GetModelRequest(name=MODEL))
            assert info.version == 2
            assert [(v.version, v.state) for v in info.versions] == [
                (1, "UNAVAILABLE"),
                (2, "READY"),
            ]


async def test_unload_while_streaming_drains_and_refuses_new_sessions(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    server = _explicit(make_server, repo)
    x = inputs(10, seed=6)
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        async with RawStream(server.target) as raw:
            live = await _open(raw)
            first = await _stream(raw, live.session_id, x[:5])
            unloaded = await native.UnloadModel(pb.UnloadModelRequest(name=MODEL))
            assert [(v.version, v.state, v.sessions) for v in unloaded.versions] == [
                (1, "UNLOADING", 1)
            ]
            refused = await raw.error(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
            assert refused.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "no ready version" in refused.message and "unloaded" in refused.message
            rest = await _stream(raw, live.session_id, x[5:], 5)  # the live one goes on
            np.testing.assert_allclose(
                np.concatenate(first + rest), reference(101, x), rtol=0, atol=ATOL
            )
            await raw.request(
                pb.StreamRequest(end=pb.EndSessionRequest(session_id=live.session_id))
            )
            for _ in range(200):
                if not server.run(lambda: probe.loaded_versions(server.engine, MODEL)):
                    break
                await asyncio.sleep(0.02)
            assert server.run(lambda: probe.loaded_versions(server.engine, MODEL)) == []
            assert _index(server)[(MODEL, 1)] == [("UNAVAILABLE", "unloaded")]
            # Loaded again, it serves again.
            await native.LoadModel(pb.LoadModelRequest(name=MODEL))
            again = await _open(raw)
            np.testing.assert_allclose(
                np.concatenate(await _stream(raw, again.session_id, x)),
                reference(101, x),
                rtol=0,
                atol=ATOL,
            )


async def test_a_corrupt_version_leaves_the_previous_one_serving(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    write_version(repo, MODEL, 2, seed=202)
    server = _explicit(make_server, repo, metrics_port=0)
    x = inputs(6, seed=7)
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        write_corrupt(repo, MODEL, 3)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await native.LoadModel(pb.LoadModelRequest(name=MODEL))
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 3 failed to load" in (failed.value.details() or "")
        info = await native.GetModel(pb.GetModelRequest(name=MODEL))
        assert info.version == 2
        states = {v.version: (v.state, v.reason) for v in info.versions}
        assert states[2] == ("READY", "")
        assert states[3][0] == "UNAVAILABLE" and "ONNX Runtime cannot load" in states[3][1]
        async with RawStream(server.target) as raw:
            opened = await _open(raw)
            assert opened.model_version == 2
            y = np.concatenate(await _stream(raw, opened.session_id, x))
        np.testing.assert_allclose(y, reference(202, x), rtol=0, atol=ATOL)
    failures = server.server.metrics.model_loads.labels(MODEL, "3", "failed")._value.get()
    assert failures == 1


async def test_after_the_drain_timeout_sessions_are_told_why(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    server = _explicit(make_server, repo, drain_timeout=0.3)
    x = inputs(3, seed=8)
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        async with RawStream(server.target) as raw:
            live = await _open(raw)
            await _stream(raw, live.session_id, x)
            write_version(repo, MODEL, 2, seed=202)
            await native.LoadModel(pb.LoadModelRequest(name=MODEL))
            notice = await asyncio.wait_for(raw.call.read(), 30)
            assert notice.WhichOneof("kind") == "ended", notice
            assert notice.ended.session_id == live.session_id
            assert notice.ended.reason == "unloaded"
            assert "version 1" in notice.ended.message and "--drain-timeout" in notice.ended.message
            late = await raw.error(
                pb.StreamRequest(frame=pb.Frame(session_id=live.session_id, frame_index=3))
            )
            assert late.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert "was unloaded" in late.message and "replaced by version 2" in late.message


async def test_versions_by_number_and_policy(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    write_version(repo, MODEL, 2, seed=202)
    (repo / MODEL / "config.toml").write_text('version_policy = "all"\n')
    server = make_server(model_repository=repo)
    x = inputs(4, seed=9)
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        for version, seed in ((1, 101), (2, 202), (0, 202)):
            info = await native.GetModel(pb.GetModelRequest(name=MODEL, version=version))
            assert info.version == (version or 2)
            stateless = await native.Infer(
                pb.InferRequest(
                    model=MODEL,
                    model_version=version,
                    inputs=[x_tensor(x)],
                )
            )
            got = decode(stateless.outputs[0])
            np.testing.assert_allclose(got, reference(seed, x), rtol=0, atol=ATOL)
        async with RawStream(server.target) as raw:
            pinned = await _open(raw, version=1)
            info = await native.GetSession(pb.GetSessionRequest(session_id=pinned.session_id))
            assert info.model_version == 1
            mismatch = await raw.error(
                pb.StreamRequest(
                    open=pb.OpenSession(model=MODEL, session_id=pinned.session_id, model_version=2)
                )
            )
            assert mismatch.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
            assert "runs version 1" in mismatch.message
        # Model control is explicit only: this server (mode none) refuses loads.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await native.LoadModel(pb.LoadModelRequest(name=MODEL))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode none" in (refused.value.details() or "")


async def test_a_stored_session_resumes_only_where_its_version_is_served(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path)
    try:
        old_repo, new_repo = tmp_path / "old", tmp_path / "new"
        write_version(old_repo, MODEL, 1, seed=101)
        (old_repo / MODEL / "config.toml").write_text("[serving]\nsession_ttl = 30\n")
        write_version(new_repo, MODEL, 2, seed=202)
        store = {"state_store": redis_server.url, "session_ttl": 60}
        a = make_server(model_repository=old_repo, **store)
        b = make_server(model_repository=new_repo, **store)
        c = make_server(model_repository=old_repo, **store)
        x = inputs(8, seed=10)
        async with RawStream(a.target) as raw:
            opened = await _open(raw)
            first = await _stream(raw, opened.session_id, x[:4])
        with redis.Redis(port=redis_server.port) as client:
            stored = client.hgetall(RedisStore.key("anonymous", opened.session_id))
            expires_in = client.pttl(RedisStore.key("anonymous", opened.session_id))
        assert stored[b"version"] == b"1"
        assert 0 < expires_in <= 30_000  # the model's own TTL, not the server's 60 s
        resume = pb.OpenSession(model=MODEL, session_id=opened.session_id, resume=True)
        async with RawStream(b.target) as raw:
            refused = await raw.error(pb.StreamRequest(open=resume))
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "version 1" in refused.message and "does not serve" in refused.message
        async with RawStream(c.target) as raw:
            response = await raw.request(pb.StreamRequest(open=resume))
            assert response.opened.resumed and response.opened.model_version == 1
            rest = await _stream(raw, opened.session_id, x[4:], 4)
        np.testing.assert_allclose(
            np.concatenate(first + rest), reference(101, x), rtol=0, atol=ATOL
        )
    finally:
        redis_server.stop()


async def test_a_load_never_pauses_another_models_batches(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    """While a slow version loads (a big graph, warmed up at large batches), frames of another
    model keep being answered: the load runs in threads, not on the event loop."""
    write_version(repo, "other", None, seed=303)
    server = make_server(
        model_repository=repo, model_control_mode="explicit", load_model=("other",)
    )
    write_version(repo, MODEL, 1, seed=404, hidden=512)
    # Warm-up runs long enough that the load is still under way after a frame's round trip.
    (repo / MODEL / "config.toml").write_text(f"[serving]\nwarmup = {[256] * 32}\n")
    x = inputs(1, seed=11)
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        async with RawStream(server.target) as raw:
            opened = await raw.open("other")
            load = asyncio.ensure_future(native.LoadModel(pb.LoadModelRequest(name=MODEL)))
            index, during_load = 0, 0
            while not load.done():
                listed = await native.ListRepository(pb.ListRepositoryRequest())
                loading = any(v.model == MODEL and v.state == "LOADING" for v in listed.versions)
                await raw.frame(opened.session_id, index, x)
                index += 1
                # Both answers came while the load went on: the loop was free all along.
                during_load += loading and not load.done()
            await load
    # A load on the event loop would hold every answer (and the index) until it is done.
    assert during_load >= 1, "no frame of the other model was answered while the load ran"
    assert server.run(lambda: probe.loaded_versions(server.engine, MODEL)) == [1]


async def test_the_python_client_opens_by_version(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    write_version(repo, MODEL, 2, seed=202)
    (repo / MODEL / "config.toml").write_text('version_policy = "all"\n')
    server = make_server(model_repository=repo)
    x = inputs(4, seed=13)
    async with AsyncClient(server.target) as client:
        pinned = await client.open(MODEL, version=1)
        newest = await client.open(MODEL)
        assert (pinned.model.version, newest.model.version) == (1, 2)
        assert [(v.version, v.state) for v in newest.model.versions] == [(1, "READY"), (2, "READY")]
        for session, seed in ((pinned, 101), (newest, 202)):
            y = np.stack([(await session.step(row))["y"] for row in x])
            np.testing.assert_allclose(y, reference(seed, x), rtol=0, atol=ATOL)
            assert (await client.get_session(session.id)).model_version == session.model.version
        stateless = await client.infer(MODEL, x[:1], version=1)
        np.testing.assert_allclose(stateless["y"], reference(101, x[:1]), rtol=0, atol=ATOL)


async def test_the_python_client_follows_a_version_loaded_while_it_runs(
    make_server: Callable[..., RunningServer], repo: Path
) -> None:
    """A client that knew version 1 as the newest: sessions it opens after version 2 is loaded
    describe version 2 (open and open_many), and so does get_model without a version."""
    server = _explicit(make_server, repo)
    x = inputs(3, seed=14)
    async with AsyncClient(server.target) as client:
        assert (await client.get_model(MODEL)).version == 1
        write_version(repo, MODEL, 2, seed=202)
        async with grpc.aio.insecure_channel(server.target) as channel:
            await pb_grpc.RnnstreamStub(channel).LoadModel(pb.LoadModelRequest(name=MODEL))
        many = await client.open_many(MODEL, count=2)
        one = await client.open(MODEL)
        assert [s.model.version for s in [*many, one]] == [2, 2, 2]
        assert (await client.get_model(MODEL)).version == 2
        for session in [*many, one]:
            y = np.stack([(await session.step(row))["y"] for row in x])
            np.testing.assert_allclose(y, reference(202, x), rtol=0, atol=ATOL)
