"""Sessions you can see: ListSessions pages a principal's own sessions, an admin principal sees
and ends everyone's, and `rnnstream sessions list|show|end` drives it from a shell."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rnnstream import AsyncClient, RnnstreamError, SessionLost
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from rnnstream.server import GrpcServer
from tests.conftest import RunningServer, test_settings
from tests.services import RedisServer, free_port
from tests.streaming import HIDDEN, sequence

TOKENS = ("alice=alice-token", "bob=bob-token", "ops=ops-token")
CLI = Path(sys.executable).with_name("rnnstream")
X = sequence("gru", 3, seed=19)


async def _all_pages(client: AsyncClient, size: int, **filters: str) -> list[list[str]]:
    pages: list[list[str]] = []
    token = ""
    while True:
        page = await client.list_sessions(page_size=size, page_token=token, **filters)
        assert len(page.sessions) <= size
        pages.append([s.session_id for s in page.sessions])
        token = page.next_page_token
        if not token:
            return pages


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(RnnstreamError) as info:
        await call  # type: ignore[misc]
    return info.value.code


async def test_a_principal_pages_through_its_own_sessions(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(auth_tokens=TOKENS, admin_principals=("ops",))
    async with (
        AsyncClient(running.target, token="alice-token") as alice,
        AsyncClient(running.target, token="bob-token") as bob,
    ):
        mine = [await alice.open("gru") for _ in range(7)]
        mine += [await alice.open("rnn_tanh") for _ in range(3)]
        theirs = [await bob.open("gru") for _ in range(2)]
        await mine[0].step(X[0])
        await mine[0].step(X[1])

        pages = await _all_pages(alice, 3)
        assert [sid for page in pages for sid in page] == [s.id for s in mine]  # opened order
        first = (await alice.list_sessions(page_size=1)).sessions[0]
        assert (first.session_id, first.principal, first.model) == (mine[0].id, "alice", "gru")
        assert (first.next_frame_index, first.state, first.pending_frames) == (2, "idle", 0)
        assert first.model_version == 1 and first.store_bytes == 0  # no state store
        assert first.memory_bytes >= 4 * HIDDEN["gru"] + 2 * 4 * HIDDEN["gru"]  # state, 2 outputs

        by_model = await _all_pages(alice, 100, model="rnn_tanh")
        assert by_model == [[s.id for s in mine[7:]]]
        assert await _all_pages(alice, 100, state="active") == [[]]
        assert [sid for p in await _all_pages(alice, 100, state="idle") for sid in p] == [
            s.id for s in mine
        ]
        assert await _all_pages(bob, 100) == [[s.id for s in theirs]]

        # Sessions that open and end between pages neither repeat nor skip the others.
        page = await alice.list_sessions(page_size=4)
        await mine[5].end()
        late = await alice.open("gru")
        rest = await _all_pages(alice, 4)
        rest_after = []
        token = page.next_page_token
        while token:
            later = await alice.list_sessions(page_size=4, page_token=token)
            rest_after += [s.session_id for s in later.sessions]
            token = later.next_page_token
        assert [s.session_id for s in page.sessions] == [s.id for s in mine[:4]]
        assert rest_after == [s.id for s in mine[4:] if s is not mine[5]] + [late.id]
        assert sum(len(p) for p in rest) == 10

        # Another principal's sessions are out of reach without the admin role.
        assert (
            await _code(bob.list_sessions(principal="alice")) == grpc.StatusCode.PERMISSION_DENIED
        )
        assert await _code(bob.get_session(mine[0].id, "alice")) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await _code(bob.end_session(mine[0].id, "alice")) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert (await alice.get_session(mine[0].id)).next_frame_index == 2  # untouched
        # Nonsense is refused, naming what is wrong.
        with pytest.raises(RnnstreamError, match="page token") as bad:
            await alice.list_sessions(page_token="m:nope")
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RnnstreamError, match="page size") as bad:
            await alice.list_sessions(page_size=1001)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_admin_sees_and_ends_every_principals_sessions(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(auth_tokens=TOKENS, admin_principals=("ops",))
    async with (
        AsyncClient(running.target, token="alice-token") as alice,
        AsyncClient(running.target, token="bob-token") as bob,
        AsyncClient(running.target, token="ops-token") as ops,
    ):
        a = [await alice.open("gru") for _ in range(3)]
        b = [await bob.open("lstm") for _ in range(2)]
        everyone = [sid for page in await _all_pages(ops, 2) for sid in page]
        assert everyone == [s.id for s in a + b]
        assert [sid for p in await _all_pages(ops, 10, principal="bob") for sid in p] == [
            s.id for s in b
        ]
        assert await _all_pages(ops, 10, principal="carol") == [[]]
        shown = await ops.get_session(b[1].id, "bob")
        assert (shown.principal, shown.model) == ("bob", "lstm")

        ended = await ops.end_session(a[1].id, "alice")
        assert ended.reason == "operator"
        # Alice's stream is told, and her next frame says why.
        with pytest.raises(SessionLost, match="operator"):
            await a[1].step(X[0])
        with pytest.raises(RnnstreamError, match="ended by an operator") as gone:
            await alice.get_session(a[1].id)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
        assert (await a[0].step(X[0]))["y"].shape[-1] == HIDDEN["gru"]  # the others go on
        # Unary and stream requests name the principal the same way: a raw stub too.
        channel = grpc.aio.insecure_channel(running.target)
        try:
            stub = pb_grpc.RnnstreamStub(channel)
            reply = await stub.ListSessions(
                pb.ListSessionsRequest(state=pb.SESSION_IDLE, principal="alice"),
                metadata=(("authorization", "Bearer ops-token"),),
            )
            assert [s.session_id for s in reply.sessions] == [a[0].id, a[2].id]
            assert all(s.state == pb.SESSION_IDLE for s in reply.sessions)
        finally:
            await channel.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"auth_tokens": TOKENS, "admin_principals": ("carol",)}, "'carol', which no bearer"),
        ({"admin_principals": ("ops",)}, "needs bearer tokens or client certificates"),
    ],
)
def test_an_admin_no_call_can_be_is_refused_at_start(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        GrpcServer(test_settings(**overrides))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    return subprocess.run(
        [str(CLI), "sessions", *args], capture_output=True, text=True, timeout=60, env=env
    )


async def test_the_sessions_command(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(auth_tokens=TOKENS, admin_principals=("ops",))
    ops = ("--target", running.target, "--token", "ops-token")
    async with AsyncClient(running.target, token="alice-token") as alice:
        sessions = [await alice.open("gru") for _ in range(3)]
        await sessions[2].step(X[0])
        listed = _cli("list", *ops, "--all", "--page-size", "2", "--json")
        assert listed.returncode == 0, listed.stderr
        found = json.loads(listed.stdout)["sessions"]
        assert [s["session_id"] for s in found] == [s.id for s in sessions]
        assert found[2]["next_frame_index"] == 1 and found[2]["principal"] == "alice"

        table = _cli("list", *ops, "--page-size", "2")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:5] == ["SESSION", "PRINCIPAL", "MODEL", "VERSION", "STATE"]
        assert [line.split()[0] for line in lines[1:]] == [s.id for s in sessions[:2]]
        assert "--page-token m:" in table.stderr

        shown = _cli("show", sessions[2].id, *ops, "--principal", "alice")
        assert shown.returncode == 0, shown.stderr
        assert f"session_id: {sessions[2].id}" in shown.stdout
        assert "state: idle" in shown.stdout

        refused = _cli("end", sessions[0].id, "--target", running.target, "--token", "bob-token")
        assert refused.returncode == 1 and "unknown session" in refused.stderr
        refused = _cli(
            "show", sessions[0].id, "--target", running.target, "--token", "bob-token",
            "--principal", "alice",
        )  # fmt: skip
        assert refused.returncode == 1 and "admin principals" in refused.stderr

        ended = _cli("end", sessions[0].id, *ops, "--principal", "alice")
        assert ended.returncode == 0, ended.stderr
        assert f"ended session {sessions[0].id} after 0 frames" in ended.stdout
        left = await alice.list_sessions()
        assert [s.session_id for s in left.sessions] == [s.id for s in sessions[1:]]


def _gauge(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "rnnstream_sessions":
            return {s.labels["state"]: s.value for s in family.samples}
    return {}


async def test_sessions_by_state_metric(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(metrics_port=free_port())
    async with AsyncClient(running.target) as client:
        for _ in range(5):
            await client.open("gru")
        deadline = time.monotonic() + 30
        while _gauge(running.server.metrics_port).get("idle") != 5:
            assert time.monotonic() < deadline, _gauge(running.server.metrics_port)
            time.sleep(0.1)
        assert _gauge(running.server.metrics_port) == {"active": 0, "idle": 5, "spilled": 0}


async def test_spilled_sessions_are_listed_after_those_in_memory(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    store = RedisServer(tmp_path)
    try:
        running = make_server(
            auth_tokens=TOKENS,
            admin_principals=("ops",),
            state_store=store.url,
            spill_after=0.2,
            session_ttl=60,
            metrics_port=free_port(),
        )
        async with (
            AsyncClient(running.target, token="alice-token") as alice,
            AsyncClient(running.target, token="bob-token") as bob,
            AsyncClient(running.target, token="ops-token") as ops,
        ):
            spilled = [await alice.open("gru") for _ in range(5)]
            theirs = [await bob.open("lstm") for _ in range(3)]
            await spilled[1].step(X[0])
            deadline = time.monotonic() + 30
            while len((await ops.list_sessions(state="spilled", page_size=100)).sessions) < 8:
                assert time.monotonic() < deadline, "the idle sessions never spilled"
                await asyncio.sleep(0.05)
            live = [await alice.open("gru") for _ in range(2)]

            pages = await _all_pages(alice, 2)
            assert [sid for p in pages for sid in p] == [s.id for s in live] + sorted(
                s.id for s in spilled
            )  # memory first (opened order), then the store (by id)
            listed = (await alice.list_sessions(page_size=100)).sessions
            states = {s.session_id: s.state for s in listed}
            assert all(states[s.id] == "spilled" for s in spilled)
            assert all(states[s.id] == "idle" for s in live)
            one = next(s for s in listed if s.session_id == spilled[1].id)
            assert (one.next_frame_index, one.memory_bytes, one.principal) == (1, 0, "alice")
            assert one.store_bytes > 0 and one.idle_seconds > 0 and one.expires_in_seconds > 0

            assert [s for p in await _all_pages(alice, 3, state="spilled") for s in p] == sorted(
                s.id for s in spilled
            )
            assert [s for p in await _all_pages(alice, 3, state="idle") for s in p] == [
                s.id for s in live
            ]
            assert [s for p in await _all_pages(bob, 2) for s in p] == sorted(t.id for t in theirs)
            assert await _all_pages(alice, 10, model="lstm") == [[]]
            everyone = [s for p in await _all_pages(ops, 3) for s in p]
            assert sorted(everyone) == sorted(s.id for s in spilled + theirs + live)
            only_bob = [s for p in await _all_pages(ops, 2, principal="bob") for s in p]
            assert only_bob == sorted(t.id for t in theirs)
            assert await _code(bob.list_sessions(principal="alice")) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            # An operator ends a spilled session: gone from the store, its owner told why.
            ended = await ops.end_session(theirs[0].id, "bob")
            assert ended.reason == "operator"
            with pytest.raises(RnnstreamError, match="ended by an operator"):
                await bob.get_session(theirs[0].id)
            metric = _gauge(running.server.metrics_port)
            assert metric.get("spilled", 0) >= 7
    finally:
        store.stop()
