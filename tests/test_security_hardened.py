"""The hardened example configuration (deploy/hardened/rnnstream.env) as a real process: a second
principal with a valid certificate and token can neither see, continue, end, evict nor starve
the first principal's sessions and OIP sequences."""

from __future__ import annotations

import asyncio
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests.hardened import HardenedServer
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor
from tests.tenants import Tenant, end_request, oip_output, oip_request

MODEL = "gru"
X = sequence(MODEL, 8, seed=84)
ATOL = 1e-5


@pytest.fixture(scope="module")
def hardened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HardenedServer]:
    server = HardenedServer(tmp_path_factory.mktemp("hardened"), ("alice", "bob"))
    yield server
    assert server.close() == 0, "\n".join(server.lines)


def _reference(rows: slice) -> np.ndarray:  # type: ignore[type-arg]
    return ort_full(MODEL, X[rows])


async def _bob_cannot_see_continue_or_end(bob: Tenant, session_ids: list[str]) -> None:
    for sid in session_ids:
        for rpc, request in (
            ("GetSession", pb.GetSessionRequest(session_id=sid)),
            ("Forecast", pb.ForecastRequest(session_id=sid, steps=1)),
            ("EndSession", pb.EndSessionRequest(session_id=sid)),
        ):
            assert await bob.unary_refusal(rpc, request) == (
                grpc.StatusCode.NOT_FOUND,
                f"unknown session {sid!r}",
            ), (rpc, sid)
        async with bob.stream() as stream:
            frame = pb.Frame(session_id=sid, frame_index=1, inputs=[x_tensor(X[1:2])])
            error = await stream.error(pb.StreamRequest(frame=frame))
            assert (error.code, error.message) == (
                grpc.StatusCode.NOT_FOUND.value[0],
                f"unknown session {sid!r}",
            )
            resume = pb.OpenSession(model=MODEL, session_id=sid, resume=True)
            error = await stream.error(pb.StreamRequest(open=resume))
            assert error.code == grpc.StatusCode.NOT_FOUND.value[0]
    # Alice's OIP sequence 7: not active for bob, neither to continue nor to end.
    for request in (oip_request(MODEL, X[1], 7), end_request(MODEL, X[1], 7)):
        code, message = await bob.oip_refusal(request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert message.startswith("sequence '7' is not active")


async def test_second_principal_cannot_see_continue_or_end(hardened: HardenedServer) -> None:
    alice, bob = hardened.raw("alice"), hardened.raw("bob")
    try:
        async with alice.stream() as mine:
            opened = await mine.open(MODEL)
            await mine.open(MODEL, "job")
            made = [await mine.frame(opened.session_id, 0, X[0:1])]
            chosen = [await mine.frame("job", 0, X[0:1])]
            seq = [oip_output(await alice.oip_infer(oip_request(MODEL, X[0], 7, start=True)))]
            await _bob_cannot_see_continue_or_end(bob, [opened.session_id, "job"])
            # Bob's own "job" and sequence 7 are his, apart from alice's.
            async with bob.stream() as his:
                assert not (await his.open(MODEL, "job")).resumed
                np.testing.assert_allclose(
                    await his.frame("job", 0, X[5:6]), _reference(slice(5, 6)), rtol=0, atol=ATOL
                )
            theirs = oip_output(await bob.oip_infer(oip_request(MODEL, X[6], 7, start=True)))
            np.testing.assert_allclose(theirs, _reference(slice(6, 7))[0], rtol=0, atol=ATOL)
            # Alice goes on as if bob had never been there.
            for i in range(1, len(X)):
                made.append(await mine.frame(opened.session_id, i, X[i : i + 1]))
                chosen.append(await mine.frame("job", i, X[i : i + 1]))
                last = i == len(X) - 1
                request = end_request if last else oip_request
                seq.append(oip_output(await alice.oip_infer(request(MODEL, X[i], 7))))
        for outputs in (np.concatenate(made), np.concatenate(chosen), np.stack(seq)):
            np.testing.assert_allclose(outputs, _reference(slice(None)), rtol=0, atol=ATOL)
    finally:
        await alice.close()
        await bob.close()


async def test_credentials_are_not_enough_alone(hardened: HardenedServer) -> None:
    alice = hardened.tenants["alice"]
    attempts = {
        # Bob holding alice's token: his certificate still names bob.
        "must agree": hardened.raw("bob", token=alice.token),
        "missing bearer token": Tenant(hardened.target, alice.cert.credentials()),
    }
    for problem, tenant in attempts.items():
        try:
            code, message = await tenant.unary_refusal("ListModels", pb.ListModelsRequest())
            assert code == grpc.StatusCode.UNAUTHENTICATED and problem in message
        finally:
            await tenant.close()
    # No client certificate: the TLS handshake fails before any RPC.
    anonymous = grpc.aio.secure_channel(hardened.target, hardened.pki.server_credentials())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anonymous.unary_unary("/rnnstream.v1.Rnnstream/ListModels")(
                b"", metadata=(("authorization", f"Bearer {alice.token}"),), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await anonymous.close()


async def test_second_principal_cannot_evict(hardened: HardenedServer) -> None:
    env = hardened.env
    quota = int(env["RNNSTREAM_MAX_SESSIONS_PER_PRINCIPAL"])
    per_stream = int(env["RNNSTREAM_MAX_SESSIONS_PER_STREAM"])
    alice, bob = hardened.raw("alice"), hardened.raw("bob")
    try:
        async with alice.stream() as mine, AsyncExitStack() as bobs:
            for i in range(3):
                await mine.open(MODEL, f"idle-{i}")
                await mine.frame(f"idle-{i}", 0, X[0:1])
            seq = [oip_output(await alice.oip_infer(oip_request(MODEL, X[0], 9, start=True)))]
            # Bob opens past his quota over as many streams as it takes: each open beyond it
            # evicts one of his own idle sessions, told on the stream that holds it.
            streams = [
                await bobs.enter_async_context(bob.stream()) for _ in range(quota // per_stream + 1)
            ]
            evicted: list[str] = []
            for n in range(quota + 20):
                stream = streams[n // per_stream]
                opened = await stream.request(
                    pb.StreamRequest(open=pb.OpenSession(model=MODEL, session_id=f"b{n}"))
                )
                assert opened.opened.session_id == f"b{n}", opened
            while len(evicted) < 20:
                reply = await asyncio.wait_for(streams[0].call.read(), 10)
                assert reply.ended.reason == "evicted", reply
                evicted.append(reply.ended.session_id)
            assert evicted == [f"b{n}" for n in range(20)]  # his own longest-idle, in order
            for i in range(3):
                y = await mine.frame(f"idle-{i}", 1, X[1:2])
                np.testing.assert_allclose(y, _reference(slice(0, 2))[1:], rtol=0, atol=ATOL)
            seq.append(oip_output(await alice.oip_infer(end_request(MODEL, X[1], 9))))
            np.testing.assert_allclose(np.stack(seq), _reference(slice(0, 2)), rtol=0, atol=ATOL)
    finally:
        await alice.close()
        await bob.close()


async def test_second_principal_cannot_starve(hardened: HardenedServer) -> None:
    rate = float(hardened.env["RNNSTREAM_RATE_LIMIT_FRAMES"])
    burst = float(hardened.env["RNNSTREAM_RATE_LIMIT_BURST"])
    flood = sequence(MODEL, int(burst), seed=88)  # on each of bob's 3 streams
    alice, bob = hardened.raw("alice"), hardened.raw("bob")
    try:
        async with alice.stream() as mine, AsyncExitStack() as bobs:
            streams = [await bobs.enter_async_context(bob.stream()) for _ in range(3)]
            for i, stream in enumerate(streams):
                await stream.open(MODEL, f"flood-{i}")
            await mine.open(MODEL, "steady")
            started = time.monotonic()

            async def floods(stream: RawStream, sid: str) -> np.ndarray:  # type: ignore[type-arg]
                # Written back to back, read at the end: the fastest a client can push.
                for k in range(len(flood)):
                    await stream.call.write(frame_request(sid, k, x_tensor(flood[k : k + 1])))
                return np.concatenate([_y(await stream.call.read()) for _ in range(len(flood))])

            flooding = [
                asyncio.ensure_future(floods(s, f"flood-{i}")) for i, s in enumerate(streams)
            ]
            ys = [await mine.frame("steady", k, X[k : k + 1]) for k in range(len(X))]
            seq = [oip_output(await alice.oip_infer(oip_request(MODEL, X[0], 11, start=True)))]
            for k in range(1, len(X)):
                request = end_request if k == len(X) - 1 else oip_request
                seq.append(oip_output(await alice.oip_infer(request(MODEL, X[k], 11))))
            # Bob's unary calls meanwhile meet the same bucket: refused, with a retry hint.
            request = pb.InferRequest(model=MODEL, inputs=[x_tensor(X[0:1])])
            refused = None
            for _ in range(int(burst)):  # his streams keep his bucket empty: one is enough
                try:
                    await bob.native.Infer(request, metadata=bob.metadata, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
            outputs = await asyncio.gather(*flooding)
            elapsed = time.monotonic() - started
        np.testing.assert_allclose(np.concatenate(ys), _reference(slice(None)), rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.stack(seq), _reference(slice(None)), rtol=0, atol=ATOL)
        for flooded in outputs:
            np.testing.assert_allclose(flooded, ort_full(MODEL, flood), rtol=0, atol=ATOL)
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(refused.trailing_metadata() or ())["grpc-retry-pushback-ms"]) > 0
        # 3 x burst frames at `rate` after one burst: the bucket's hard lower bound.
        assert elapsed >= (3 * burst - burst) / rate
        text = _scrape_text(hardened)
        assert 'rnnstream_principal_throttled_seconds_total{principal="bob"}' in text
        assert 'rnnstream_principal_throttled_seconds_total{principal="alice"}' not in text
    finally:
        await alice.close()
        await bob.close()


def _y(reply: pb.StreamResponse) -> np.ndarray:  # type: ignore[type-arg]
    (tensor,) = reply.output.outputs
    return np.frombuffer(tensor.data, np.float32).reshape(1, -1)


def _scrape(port: int, token: str | None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request("GET", "/metrics", headers=headers)
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    finally:
        connection.close()


def _scrape_text(hardened: HardenedServer) -> str:
    status, text = _scrape(hardened.metrics_port, hardened.metrics_token)
    assert status == 200
    return text


def test_documented_probe_command(hardened: HardenedServer, tmp_path: Path) -> None:
    cert, key = hardened.pki.client("probe").write(tmp_path, "probe")
    command = [sys.executable, "-m", "rnnstream", "health", "--target", hardened.target]
    command += ["--tls-ca", str(hardened.pki.ca_path), "--tls-cert", str(cert)]
    command += ["--tls-key", str(key)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    probe = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "SERVING" in probe.stdout
    # Without a client certificate the probe cannot even connect.
    command = command[: command.index("--tls-cert")]
    probe = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert probe.returncode != 0


def test_metrics_need_their_token(hardened: HardenedServer) -> None:
    assert _scrape(hardened.metrics_port, None)[0] == 401
    assert _scrape(hardened.metrics_port, hardened.tenants["alice"].token)[0] == 401
    assert "rnnstream_active_sessions" in _scrape_text(hardened)
