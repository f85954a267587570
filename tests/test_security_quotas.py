"""Sessions per principal: a quota over all of a principal's streams, and eviction that never
pushes out a smaller tenant to make room for a larger one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import AsyncExitStack

import grpc
import numpy as np

from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.probe import held_by, session_count
from tests.streaming import RawStream, ort_full, sequence, x_tensor
from tests.tenants import Tenant

MODEL = "gru"
X = sequence(MODEL, 3, seed=85)
TOKENS = ("alice=alice-token", "bob=bob-token", "carol=carol-token")
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def _tenants(running: RunningServer) -> dict[str, Tenant]:
    return {name: Tenant(running.target, token=f"{name}-token") for name in ("alice", "bob")}


async def _open(stream: RawStream, session_id: str = "") -> pb.StreamResponse:
    return await stream.request(
        pb.StreamRequest(open=pb.OpenSession(model=MODEL, session_id=session_id))
    )


async def _alice_is_intact(alice: Tenant, stream: RawStream, ids: list[str]) -> None:
    """Every one of alice's sessions is still hers and runs on from its first frame."""
    for sid in ids:
        info = await alice.native.GetSession(
            pb.GetSessionRequest(session_id=sid), metadata=alice.metadata, timeout=5
        )
        assert info.next_frame_index == 1, sid
        ys = [await stream.frame(sid, i, X[i : i + 1]) for i in (1, 2)]
        np.testing.assert_allclose(np.concatenate(ys), ort_full(MODEL, X)[1:], rtol=0, atol=1e-5)


async def test_quota_counts_every_stream_of_a_principal(
    make_server: Callable[..., RunningServer],
) -> None:
    # Before: --max-sessions 10 let bob take 9 over several streams (the per-stream cap is per
    # stream) and alice's next open was refused.
    running = make_server(
        auth_tokens=TOKENS, max_sessions=10, max_sessions_per_principal=6, max_sessions_per_stream=2
    )
    alice, bob = _tenants(running).values()
    async with AsyncExitStack() as streams:
        bobs = [await streams.enter_async_context(bob.stream()) for _ in range(4)]
        for stream in bobs[:3]:
            for _ in range(2):
                assert (await _open(stream)).WhichOneof("kind") == "opened"
        refused = (await _open(bobs[3])).error
        assert refused.code == EXHAUSTED
        assert refused.message == (
            "principal 'bob' holds 6 sessions, its limit (--max-sessions-per-principal 6); "
            "end idle sessions"
        )
        alices = [await streams.enter_async_context(alice.stream()) for _ in range(2)]
        for stream in alices:
            for _ in range(2):
                assert (await _open(stream)).WhichOneof("kind") == "opened"
        # The server's own cap still holds: 10 open, no eviction asked for.
        third = await streams.enter_async_context(alice.stream())
        refused = (await _open(third)).error
        assert refused.code == EXHAUSTED and refused.message.startswith("session limit reached")
        assert running.run(lambda: session_count(running.engine)) == 10
    await alice.close()
    await bob.close()


async def test_eviction_never_takes_a_smaller_tenants_sessions(
    make_server: Callable[..., RunningServer],
) -> None:
    # Before: with --evict-idle-when-full, bob's opens evicted all of alice's idle sessions.
    running = make_server(auth_tokens=TOKENS, max_sessions=10, evict_idle_when_full=True)
    alice, bob = _tenants(running).values()
    async with alice.stream() as mine, bob.stream() as his:
        ids = []
        for i in range(3):
            await mine.open(MODEL, f"a{i}")
            await mine.frame(f"a{i}", 0, X[0:1])
            ids.append(f"a{i}")
        evicted = 0
        for i in range(20):
            reply = await _open(his, f"b{i}")
            while reply.WhichOneof("kind") == "ended":  # one of bob's own, evicted for this one
                assert reply.ended.reason == "evicted" and reply.ended.session_id.startswith("b")
                evicted += 1
                reply = await his.call.read()
            assert reply.opened.session_id == f"b{i}"
        await _alice_is_intact(alice, mine, ids)
        assert evicted == 13  # bob held 7 beside alice's 3; his next 13 opens cost him his own
        # Alice, holding fewer, opens by evicting from bob, the largest holder.
        await mine.open(MODEL, "a-more")
        ended = await his.call.read()
        assert ended.ended.reason == "evicted" and ended.ended.session_id == "b13"
    await alice.close()
    await bob.close()


async def test_over_quota_evicts_only_its_own(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(
        auth_tokens=TOKENS, max_sessions_per_principal=3, evict_idle_when_full=True
    )
    alice, bob = _tenants(running).values()
    async with alice.stream() as mine, bob.stream() as first, bob.stream() as second:
        await mine.open(MODEL, "a0")
        await mine.frame("a0", 0, X[0:1])
        for i in range(3):
            await first.open(MODEL, f"b{i}")
        # Bob's 4th, on another stream, costs his own longest-idle session, told on its stream.
        assert (await _open(second, "b3")).opened.session_id == "b3"
        ended = await first.call.read()
        assert (ended.ended.session_id, ended.ended.reason) == ("b0", "evicted")
        assert running.run(lambda: held_by(running.engine, "bob")) == 3
        await _alice_is_intact(alice, mine, ["a0"])
    await alice.close()
    await bob.close()


async def test_one_principal_cannot_take_the_whole_memory_budget(
    make_server: Callable[..., RunningServer],
) -> None:
    """bob's concurrent calls stop at his share of the budget (--max-buffered-bytes-per-principal)
    with RESOURCE_EXHAUSTED naming it, while alice's call, made when bob holds all he may, is
    admitted and answered exactly."""
    mib = 1024 * 1024
    running = make_server(
        auth_tokens=TOKENS,
        max_buffered_bytes=64 * mib,
        max_buffered_bytes_per_principal=8 * mib,
    )
    alice, bob = _tenants(running).values()
    x = sequence(MODEL, 4096, seed=86)  # 256 KiB in, 2 MiB out: about 2.3 MiB held per call
    request = pb.InferRequest(model=MODEL, inputs=[x_tensor(x)])
    release = threading.Event()
    probe.block_ort(running.engine, release)
    try:
        bobs = [
            asyncio.ensure_future(bob.native.Infer(request, metadata=bob.metadata, timeout=60))
            for _ in range(10)
        ]
        await asyncio.sleep(0.5)
        held = running.run(lambda: running.engine.budget.held_by("bob"))
        assert 6 * mib < held <= 8 * mib, held
        alices = asyncio.ensure_future(
            alice.native.Infer(request, metadata=alice.metadata, timeout=60)
        )
        await asyncio.sleep(0.2)
        assert not alices.done(), "alice was refused while bob held his share"
        release.set()
        results = await asyncio.gather(*bobs, return_exceptions=True)
        answer = await alices
    finally:
        release.set()
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 7, results
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert all("--max-buffered-bytes-per-principal" in (r.details() or "") for r in refused)
    np.testing.assert_allclose(decode(answer.outputs[0]), ort_full(MODEL, x), atol=1e-4)
    assert running.run(lambda: running.engine.budget.held()) == 0
    await alice.close()
    await bob.close()
