"""The hardened example configuration (deploy/hardened/rnnstream.env) as a real process: a second
principal with a valid certificate and token can neither see, continue, end, evict nor starve
the first principal's sessions and OIP sequences."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests.hardened import HardenedServer
from tests.streaming import ort_full, sequence, x_tensor
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


def _scrape(port: int, token: str | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request("GET", "/metrics", headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_metrics_need_their_token(hardened: HardenedServer) -> None:
    assert _scrape(hardened.metrics_port, None) == 401
    assert _scrape(hardened.metrics_port, hardened.tenants["alice"].token) == 401
    assert _scrape(hardened.metrics_port, hardened.metrics_token) == 200
