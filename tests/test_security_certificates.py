"""With --tls-client-ca the client certificate names the principal: each certificate holder owns
its sessions and OIP sequences, as each token holder does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer, missing_dependency
from tests.pki import ClientCert, Pki
from tests.streaming import ort_full, sequence, x_tensor
from tests.tenants import (
    TRITON_PYTHON,
    Tenant,
    drive_tritonclient,
    end_request,
    oip_output,
    oip_request,
)

MODEL = "gru"
X = sequence(MODEL, 6, seed=81)
ATOL = 1e-5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _mtls(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {
        "tls_cert": str(pki.cert_path),
        "tls_key": str(pki.key_path),
        "tls_client_ca": str(pki.ca_path),
        **overrides,
    }


def _same_refusal(theirs: tuple[grpc.StatusCode, str], never: tuple[grpc.StatusCode, str]) -> None:
    """Another principal's sequence 7 is refused exactly like sequence 1007 that never was."""
    assert theirs[0] == never[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert theirs[1] == never[1].replace("1007", "7")


async def test_oip_sequence_belongs_to_its_certificate(
    make_server: Callable[..., RunningServer], pki: Pki
) -> None:
    # Before: every certificate holder was one principal; client-2 continued and then ended
    # client-1's sequence 7 (perf_analyzer picks ids from 1000:100000, so they collide by chance).
    running = make_server(**_mtls(pki))
    one = Tenant(running.target, pki.client("client-1").credentials())
    two = Tenant(running.target, pki.client("client-2").credentials())
    try:
        ys = [oip_output(await one.oip_infer(oip_request(MODEL, X[0], 7, start=True)))]
        ys.append(oip_output(await one.oip_infer(oip_request(MODEL, X[1], 7))))
        for request, never in (
            (oip_request(MODEL, X[2], 7), oip_request(MODEL, X[2], 1007)),
            (end_request(MODEL, X[2], 7), end_request(MODEL, X[2], 1007)),
        ):
            _same_refusal(await two.oip_refusal(request), await two.oip_refusal(never))
        # client-2 starting "its" sequence 7 gets a sequence of its own, from the initial state.
        theirs = oip_output(await two.oip_infer(oip_request(MODEL, X[5], 7, start=True)))
        np.testing.assert_allclose(theirs, ort_full(MODEL, X[5:6])[0], rtol=0, atol=ATOL)
        # A second certificate with client-1's name is client-1: it continues the sequence.
        again = Tenant(running.target, pki.client("client-1").credentials())
        ys.append(oip_output(await again.oip_infer(oip_request(MODEL, X[2], 7))))
        await again.close()
        for x in X[3:-1]:
            ys.append(oip_output(await one.oip_infer(oip_request(MODEL, x, 7))))
        ys.append(oip_output(await one.oip_infer(end_request(MODEL, X[-1], 7))))
        np.testing.assert_allclose(np.stack(ys), ort_full(MODEL, X), rtol=0, atol=ATOL)
        # client-2's own sequence 7 went on untouched by client-1's end.
        second = oip_output(await two.oip_infer(end_request(MODEL, X[0], 7)))
        np.testing.assert_allclose(second, ort_full(MODEL, X[[5, 0]])[1], rtol=0, atol=ATOL)
        assert running.run(lambda: probe.session_count(running.engine)) == 0
    finally:
        await one.close()
        await two.close()


async def test_tritonclient_tenants_with_certificates(
    make_server: Callable[..., RunningServer], pki: Pki, tmp_path: Path
) -> None:
    if not TRITON_PYTHON.exists():
        missing_dependency("tritonclient venv missing: run `bash bench/perf_analyzer_setup.sh`")
    running = make_server(**_mtls(pki))
    clients: dict[str, dict[str, Any]] = {}
    for name in ("client-1", "client-2"):
        cert, key = pki.client(name).write(tmp_path, name)
        clients[name] = {"ca": str(pki.ca_path), "cert": str(cert), "key": str(key)}
    steps: list[dict[str, Any]] = []

    def infer(client: str, x: np.ndarray[Any, Any], **flags: bool) -> None:
        steps.append({"client": client, "call": "infer", "model": MODEL, "x": x.tolist()})
        steps[-1].update(sequence_id=4242, **flags)

    infer("client-1", X[0], start=True)
    infer("client-1", X[1])
    infer("client-2", X[2])  # continue client-1's sequence: refused
    infer("client-2", X[2], end=True)  # end it: refused
    for x in X[2:-1]:
        infer("client-1", x)
    infer("client-1", X[-1], end=True)
    results = drive_tritonclient(tmp_path, running.target, clients, steps)
    for refused in results[2:4]:
        assert not refused["ok"] and refused["status"] == "StatusCode.FAILED_PRECONDITION"
        assert "sequence '4242' is not active" in refused["message"]
    ys = [r["value"] for r in results[:2] + results[4:]]
    np.testing.assert_allclose(np.array(ys), ort_full(MODEL, X), rtol=0, atol=ATOL)


async def _open_and_resume(
    running: RunningServer, owner: ClientCert, others: dict[ClientCert, bool]
) -> None:
    """`owner` opens session "job"; each of `others` resumes it (True) or is told it is unknown."""
    async with Tenant(running.target, owner.credentials()).stream() as stream:
        await stream.open(MODEL, "job")
        await stream.frame("job", 0, X[0:1])
        for cert, same_principal in others.items():
            async with Tenant(running.target, cert.credentials()).stream() as theirs:
                resume = pb.OpenSession(model=MODEL, session_id="job", resume=True)
                reply = await theirs.request(pb.StreamRequest(open=resume))
                if same_principal:
                    assert reply.opened.resumed and reply.opened.next_frame_index == 1
                else:
                    assert reply.error.code == grpc.StatusCode.NOT_FOUND.value[0]
                    assert reply.error.message == "unknown session 'job'"
        await stream.request(pb.StreamRequest(end=pb.EndSessionRequest(session_id="job")))


FIELDS = {
    "cn": lambda value: {"common_name": value},
    "dns": lambda value: {"common_name": "shared", "dns": (f"{value}.example.org",)},
    "uri": lambda value: {"common_name": "shared", "uri": (f"spiffe://example.org/{value}",)},
    "email": lambda value: {"common_name": "shared", "email": (f"{value}@example.org",)},
}


@pytest.mark.parametrize("field", FIELDS)
async def test_principal_field_is_configurable(
    make_server: Callable[..., RunningServer], pki: Pki, field: str
) -> None:
    running = make_server(**_mtls(pki, tls_client_principal=field))
    names = FIELDS[field]
    team_a = pki.client(**names("team-a"))
    other_key_same_name = pki.client(**names("team-a"))
    team_b = pki.client(**names("team-b"))
    await _open_and_resume(running, team_a, {other_key_same_name: True, team_b: False})


NAMES = "(it names the principal)"
UNCLEAR = {
    "no CN": ("cn", {"common_name": None}, f"exactly one subject common name {NAMES}; it has 0"),
    "no DNS SAN": ("dns", {"common_name": "a"}, f"one DNS subject alternative name {NAMES}"),
    "two DNS SANs": ("dns", {"common_name": "a", "dns": ("a.example", "b.example")}, "it has 2"),
    "no URI SAN": ("uri", {"common_name": "a", "dns": ("a.example",)}, "exactly one URI subject"),
    "no email SAN": ("email", {"common_name": "a"}, "exactly one email subject alternative name"),
}


@pytest.mark.parametrize(("field", "cert", "problem"), UNCLEAR.values(), ids=list(UNCLEAR))
async def test_certificate_without_a_clear_name_is_refused(
    make_server: Callable[..., RunningServer],
    pki: Pki,
    field: str,
    cert: dict[str, Any],
    problem: str,
) -> None:
    running = make_server(**_mtls(pki, tls_client_principal=field))
    tenant = Tenant(running.target, pki.client(**cert).credentials())
    try:
        code, details = await tenant.unary_refusal("ListModels", pb.ListModelsRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED and problem in details
    finally:
        await tenant.close()


async def test_token_and_certificate_must_agree(
    make_server: Callable[..., RunningServer], pki: Pki
) -> None:
    tokens = ("alice=alice-secret-token", "bob=bob-secret-token")
    running = make_server(**_mtls(pki, auth_tokens=tokens))
    alice_cert = pki.client("alice").credentials()
    agree = Tenant(running.target, alice_cert, token="alice-secret-token")
    disagree = Tenant(running.target, alice_cert, token="bob-secret-token")
    no_token = Tenant(running.target, alice_cert)
    try:
        listed = await agree.native.ListModels(pb.ListModelsRequest(), metadata=agree.metadata)
        assert MODEL in {m.name for m in listed.models}
        code, details = await disagree.unary_refusal("ListModels", pb.ListModelsRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details == (
            "the bearer token belongs to principal 'bob' but the client certificate names "
            "'alice': they must agree"
        )
        code, details = await no_token.unary_refusal("ListModels", pb.ListModelsRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details
    finally:
        for tenant in (agree, disagree, no_token):
            await tenant.close()


async def test_certificates_only_admit_with_principal_none(
    make_server: Callable[..., RunningServer], pki: Pki
) -> None:
    # --tls-client-principal none: the certificate admits the connection, the token names the
    # principal (a proxy's certificate carrying many tenants' tokens).
    tokens = ("alice=alice-secret-token", "bob=bob-secret-token")
    running = make_server(**_mtls(pki, auth_tokens=tokens, tls_client_principal="none"))
    proxy = pki.client("proxy")
    alice = Tenant(running.target, proxy.credentials(), token="alice-secret-token")
    bob = Tenant(running.target, proxy.credentials(), token="bob-secret-token")
    try:
        async with alice.stream() as stream:
            await stream.open(MODEL, "job")
            await stream.frame("job", 0, X[0:1])
            code, details = await bob.unary_refusal(
                "GetSession", pb.GetSessionRequest(session_id="job")
            )
            assert code == grpc.StatusCode.NOT_FOUND and details == "unknown session 'job'"
            info = await alice.native.GetSession(
                pb.GetSessionRequest(session_id="job"), metadata=alice.metadata
            )
            assert info.next_frame_index == 1
    finally:
        await alice.close()
        await bob.close()


async def test_native_session_frame_from_another_certificate(
    make_server: Callable[..., RunningServer], pki: Pki
) -> None:
    running = make_server(**_mtls(pki))
    one = Tenant(running.target, pki.client("client-1").credentials())
    two = Tenant(running.target, pki.client("client-2").credentials())
    try:
        async with one.stream() as mine, two.stream() as theirs:
            opened = await mine.open(MODEL)
            first = await mine.frame(opened.session_id, 0, X[0:1])
            for rpc, request in (
                ("GetSession", pb.GetSessionRequest(session_id=opened.session_id)),
                ("EndSession", pb.EndSessionRequest(session_id=opened.session_id)),
                ("Forecast", pb.ForecastRequest(session_id=opened.session_id, steps=1)),
            ):
                code, details = await two.unary_refusal(rpc, request)
                assert (code, details) == (
                    grpc.StatusCode.NOT_FOUND,
                    f"unknown session {opened.session_id!r}",
                ), rpc
            frame = pb.Frame(session_id=opened.session_id, frame_index=1, inputs=[x_tensor(X[1:2])])
            error = await theirs.error(pb.StreamRequest(frame=frame))
            assert error.code == grpc.StatusCode.NOT_FOUND.value[0]
            ys = [first] + [await mine.frame(opened.session_id, i, X[i : i + 1]) for i in (1, 2)]
            np.testing.assert_allclose(
                np.concatenate(ys), ort_full(MODEL, X[:3]), rtol=0, atol=ATOL
            )
    finally:
        await one.close()
        await two.close()
