"""TLS, mutual TLS, bearer tokens, and sessions that belong to the principal that opened them."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnstream import AsyncClient, RnnstreamError, SessionLost
from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from rnnstream.server import GrpcServer, Settings
from rnnstream.server.core import Unauthenticated
from rnnstream.server.transport.grpc._auth import Authenticator, parse_tokens
from rnnstream.server.transport.grpc._server import _credentials
from tests import probe
from tests.conftest import MODELS, RunningServer, test_settings
from tests.pki import Pki
from tests.startup import assert_refused, run_server
from tests.streaming import ort_full, sequence, x_tensor

MODEL = "gru"
X = sequence(MODEL, 4, seed=80)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def _step_over(client: AsyncClient) -> None:
    session = await client.open(MODEL)
    ys = [(await session.step(row))["y"] for row in X]
    np.testing.assert_allclose(np.stack(ys), ort_full(MODEL, X), rtol=0, atol=1e-5)
    await session.end()


async def _refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.RnnstreamStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        return info.value.code()
    finally:
        await channel.close()


async def test_tls(make_server: Callable[..., RunningServer], pki: Pki) -> None:
    running = make_server(tls_cert=str(pki.cert_path), tls_key=str(pki.key_path))
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    async with AsyncClient(running.target, credentials=credentials) as client:
        await _step_over(client)
    # A plaintext client gets nowhere.
    assert await _refused(running.target, None) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls(make_server: Callable[..., RunningServer], pki: Pki) -> None:
    running = make_server(
        tls_cert=str(pki.cert_path), tls_key=str(pki.key_path), tls_client_ca=str(pki.ca_path)
    )
    with_cert = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)
    async with AsyncClient(running.target, credentials=with_cert) as client:
        await _step_over(client)
    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    assert await _refused(running.target, without_cert) == grpc.StatusCode.UNAVAILABLE
    foreign = grpc.ssl_channel_credentials(pki.ca, pki.stranger_key, pki.stranger_cert)
    assert await _refused(running.target, foreign) == grpc.StatusCode.UNAVAILABLE
    assert running.run(lambda: probe.session_count(running.engine)) == 0


def test_tls_settings_are_checked(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        _credentials(test_settings(tls_cert=str(pki.cert_path)))
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        _credentials(test_settings(tls_client_ca=str(pki.ca_path)))


# -- bearer tokens ------------------------------------------------------------------------------
TOKENS = ("alice=alice-secret-token", "bob=bob-secret-token")


def _token_settings(tmp_path: Path, source: str) -> dict[str, Any]:
    if source == "flag":
        return {"auth_tokens": Settings.from_args(["--auth-tokens", ",".join(TOKENS)]).auth_tokens}
    if source == "env":
        env = {"RNNSTREAM_AUTH_TOKENS": ",".join(TOKENS)}
        return {"auth_tokens": Settings.from_args([], env=env).auth_tokens}
    path = tmp_path / "tokens"
    path.write_text("# principal=token, one a line\n" + "\n".join(TOKENS) + "\n\n")
    return {
        "auth_tokens_file": Settings.from_args(["--auth-tokens-file", str(path)]).auth_tokens_file
    }


def _calls(channel: grpc.aio.Channel) -> dict[str, Callable[..., Awaitable[Any]]]:
    native = pb_grpc.RnnstreamStub(channel)
    triton = oip_grpc.GRPCInferenceServiceStub(channel)
    infer = pb.InferRequest(model=MODEL, inputs=[x_tensor(X)])
    oip_infer = oip.ModelInferRequest(model_name=MODEL)
    return {
        "Infer": lambda md: native.Infer(infer, metadata=md, timeout=5),
        "ListModels": lambda md: native.ListModels(pb.ListModelsRequest(), metadata=md, timeout=5),
        "GetModel": lambda md: native.GetModel(pb.GetModelRequest(name=MODEL), metadata=md),
        "GetSession": lambda md: native.GetSession(
            pb.GetSessionRequest(session_id="s"), metadata=md
        ),
        "EndSession": lambda md: native.EndSession(
            pb.EndSessionRequest(session_id="s"), metadata=md
        ),
        "Forecast": lambda md: native.Forecast(
            pb.ForecastRequest(session_id="s", steps=1), metadata=md
        ),
        "ModelInfer": lambda md: triton.ModelInfer(oip_infer, metadata=md, timeout=5),
        "ModelMetadata": lambda md: triton.ModelMetadata(
            oip.ModelMetadataRequest(name=MODEL), metadata=md
        ),
    }


async def _stream_status(channel: grpc.aio.Channel, metadata: Any) -> grpc.StatusCode:
    call = pb_grpc.RnnstreamStub(channel).Stream(metadata=metadata, timeout=5)
    # Nothing is written: the server refuses the call on its metadata alone.
    code: grpc.StatusCode = await call.code()
    return code


async def _oip_stream_status(channel: grpc.aio.Channel, metadata: Any) -> grpc.StatusCode:
    call = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(metadata=metadata, timeout=5)
    code: grpc.StatusCode = await call.code()
    return code


BAD_METADATA = {
    "missing": (),
    "wrong": (("authorization", "Bearer not-a-token"),),
    "not bearer": (("authorization", "Basic alice-secret-token"),),
    "empty bearer": (("authorization", "Bearer "),),
    "prefix of a token": (("authorization", "Bearer alice-secret"),),
}


@pytest.mark.parametrize("source", ["flag", "env", "file"])
async def test_bearer_tokens(
    make_server: Callable[..., RunningServer], tmp_path: Path, source: str
) -> None:
    running = make_server(**_token_settings(tmp_path, source))
    assert running.server.auth.mode == "bearer tokens"
    channel = grpc.aio.insecure_channel(running.target)
    try:
        for label, metadata in BAD_METADATA.items():
            for name, call in _calls(channel).items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (label, name)
            assert await _stream_status(channel, metadata) == grpc.StatusCode.UNAUTHENTICATED
            assert await _oip_stream_status(channel, metadata) == grpc.StatusCode.UNAUTHENTICATED
        # Refused before any model work: nothing ran, nothing opened.
        stats = running.run(lambda: running.engine.model_stats(MODEL))
        assert (stats.batches, stats.frames) == (0, 0)
        assert running.run(lambda: probe.session_count(running.engine)) == 0
        # Health stays open to probes without a token.
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()
    async with AsyncClient(running.target, token="bob-secret-token") as client:
        await _step_over(client)
    async with AsyncClient(running.target, token="wrong") as client:
        with pytest.raises(RnnstreamError) as refused:
            await client.open(MODEL)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "invalid bearer token" in refused.value.message


def test_token_parsing() -> None:
    assert parse_tokens(["a=x", " b = y ", "bare", "# note", "", "bare2"]) == {
        "x": "a",
        "y": "b",
        "bare": "token-3",
        "bare2": "token-4",
    }
    auth = Authenticator(parse_tokens(["a=x"]))
    assert auth.check([("authorization", "Bearer x")]) == "a"
    assert auth.check([("authorization", "bearer  x ")]) == "a"  # scheme is case-insensitive
    assert Authenticator().check(None) == "anonymous"


BAD_TOKEN_CONFIGS = {
    # What `alice=$ALICE_TOKEN,bob=...` becomes when ALICE_TOKEN is unset.
    "alice=,bob=bob-secret-token": "principal 'alice' has an empty auth token",
    "alice= ,bob=bob-secret-token": "principal 'alice' has an empty auth token",
    "alice=same-token,bob=same-token": "principals 'alice' and 'bob' are given the same auth token",
    "alice=t1,alice=t1": "principal 'alice' lists the same auth token twice",
    "=orphan-token": "names no principal",
    "bare-token,token-1=named": "principal 'token-1' is both named and given to a bare token",
}


@pytest.mark.parametrize("tokens", BAD_TOKEN_CONFIGS)
def test_bad_token_configuration_is_refused(tokens: str, tmp_path: Path) -> None:
    # Before the fix, "alice=" made "" alice's token, and `authorization: Bearer  ` opened
    # sessions as alice; two principals with one token silently became the last one.
    expected = BAD_TOKEN_CONFIGS[tokens]
    settings = Settings.from_args([], env={"RNNSTREAM_AUTH_TOKENS": tokens})
    with pytest.raises(ValueError, match=re.escape(expected)):
        GrpcServer(settings)
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("\n".join(tokens.split(",")) + "\n")
    with pytest.raises(ValueError, match=re.escape(expected)):
        GrpcServer(test_settings(auth_tokens_file=str(tokens_file)))


def test_server_with_an_empty_token_does_not_start() -> None:
    result = run_server(
        "--model-repository", str(MODELS), "--port", "0", "--metrics-port", "0",
        env={"RNNSTREAM_AUTH_TOKENS": "alice=,bob=bob-secret-token"},
    )  # fmt: skip
    assert_refused(result, "principal 'alice' has an empty auth token")


@pytest.mark.parametrize(
    ("variables", "refusal"),
    [
        (
            {"RNNSTREAM_AUTH_TOKEN": "alice=alice-secret-token"},
            "RNNSTREAM_AUTH_TOKEN is not a setting of rnnstream-server (did you mean "
            "RNNSTREAM_AUTH_TOKENS?)",
        ),
        (
            {"RNNSTREAM_TLS_CLIENT_CERT_CA": "ca.pem"},
            "RNNSTREAM_TLS_CLIENT_CERT_CA is not a setting of rnnstream-server (did you mean "
            "RNNSTREAM_TLS_CLIENT_CA?)",
        ),
    ],
)
def test_misspelt_variable_does_not_start_an_open_server(
    variables: dict[str, str], refusal: str
) -> None:
    # Before: an unknown RNNSTREAM_* variable was ignored, so a typo in the tokens' variable
    # started a server that let everyone in as one anonymous principal.
    # The command's own variables (the server's container sets them) are not refused.
    env = {"RNNSTREAM_TOKEN": "t", "RNNSTREAM_TLS_SERVER_NAME": "x"}
    flags = ["--model-repository", str(MODELS), "--models", "gru", "--port", "0"]
    result = run_server(*flags, "--metrics-port", "0", env={**env, **variables})
    assert_refused(result, refusal)
    assert result.stderr.strip() == f"rnnstream-server: {refusal}"


def test_empty_bearer_never_matches() -> None:
    with pytest.raises(ValueError, match="empty auth token"):
        Authenticator({"": "alice"})
    auth = Authenticator(parse_tokens(["alice=alice-secret-token"]))
    for header in ("Bearer ", "Bearer  ", "Bearer \t", "bearer", "Bearer"):
        with pytest.raises(Unauthenticated, match="missing bearer token"):
            auth.check([("authorization", header)])


# -- sessions belong to their principal --------------------------------------------------------
def _same_as_unknown(theirs: RnnstreamError, unknown: RnnstreamError, sid: str, other: str) -> None:
    assert theirs.code == unknown.code == grpc.StatusCode.NOT_FOUND
    assert theirs.message == unknown.message.replace(other, sid)


async def _error(call: Awaitable[Any]) -> RnnstreamError:
    with pytest.raises(RnnstreamError) as info:
        await call
    return info.value


async def test_another_principal_cannot_touch_a_session(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(auth_tokens=TOKENS)
    never = "0123456789abcdef0123456789abcdef"
    async with (
        AsyncClient(running.target, token="alice-secret-token") as alice,
        AsyncClient(running.target, token="bob-secret-token") as bob,
    ):
        mine = await alice.open(MODEL)
        first = (await mine.step(X[0]))["y"]
        for attempt in (
            lambda sid: bob.get_session(sid),
            lambda sid: bob.end_session(sid),
            lambda sid: bob.infer(MODEL, X[1], session_id=sid),
            lambda sid: bob.forecast(MODEL, sid, 2),
        ):
            _same_as_unknown(
                await _error(attempt(mine.id)), await _error(attempt(never)), mine.id, never
            )
        # Resume by id: refused exactly like a resume of an id that never existed.
        theirs = await _error(bob.open(MODEL, mine.id, resume=True))
        unknown = await _error(bob.open(MODEL, never, resume=True))
        assert isinstance(theirs, SessionLost) and isinstance(unknown, SessionLost)
        _same_as_unknown(theirs, unknown, mine.id, never)
        # A frame for it on bob's own stream is refused in-band the same way.
        channel = grpc.aio.insecure_channel(running.target)
        try:
            call = pb_grpc.RnnstreamStub(channel).Stream(
                metadata=(("authorization", "Bearer bob-secret-token"),)
            )
            replies = []
            for sid in (mine.id, never):
                frame = pb.Frame(session_id=sid, frame_index=1, inputs=[x_tensor(X[1:2])])
                await call.write(pb.StreamRequest(frame=frame))
                replies.append((await call.read()).error)
            call.cancel()
        finally:
            await channel.close()
        assert replies[0].code == replies[1].code == grpc.StatusCode.NOT_FOUND.value[0]
        assert replies[0].message == replies[1].message.replace(never, mine.id)
        # Opening with alice's id gives bob a fresh session of his own; alice's is untouched.
        his = await bob.open(MODEL, mine.id)
        assert not his.resumed and his.next_index == 0
        await his.step(X[3])
        ys = [first] + [(await mine.step(row))["y"] for row in X[1:]]
        np.testing.assert_allclose(np.stack(ys), ort_full(MODEL, X), rtol=0, atol=1e-5)
        assert (await alice.get_session(mine.id)).next_frame_index == len(X)
        await mine.end()
        await his.end()


async def test_server_made_session_ids(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        sessions = [await client.open(MODEL) for _ in range(100)]
        ids = [s.id for s in sessions]
        for session in sessions:
            await session.end()
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
