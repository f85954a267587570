"""Frame rate per principal: unary calls over it are refused with a retry hint, streams over it
are read more slowly, and one principal's flood leaves another's frames alone."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests.conftest import RunningServer
from tests.server_process import free_port
from tests.streaming import RawStream, ort_full, sequence, x_tensor
from tests.tenants import Tenant, oip_request

MODEL = "gru"
X = sequence(MODEL, 12, seed=86)
FLOOD = sequence(MODEL, 16, seed=87)  # on each of bob's 3 streams: 48 frames in all
F32 = npt.NDArray[np.float32]
TOKENS = ("alice=alice-token", "bob=bob-token")
RATE, BURST = 20.0, 4.0


def _infer(row: int) -> pb.InferRequest:
    return pb.InferRequest(model=MODEL, inputs=[x_tensor(X[row : row + 1])])


async def _refusal(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


def _pushback_ms(error: grpc.aio.AioRpcError) -> int:
    trailing = dict(error.trailing_metadata() or ())
    return int(trailing["grpc-retry-pushback-ms"])


async def test_unary_calls_over_the_rate_are_refused_with_a_hint(
    make_server: Callable[..., RunningServer],
) -> None:
    # A slow refill (a frame a second), so the burst is still spent when the fifth call comes
    # however slowly a loaded machine makes the first four.
    rate = 1.0
    running = make_server(auth_tokens=TOKENS, rate_limit_frames=rate, rate_limit_burst=BURST)
    alice, bob = (Tenant(running.target, token=f"{n}-token") for n in ("alice", "bob"))
    try:
        for row in range(int(BURST)):
            await bob.native.Infer(_infer(row), metadata=bob.metadata, timeout=5)
        refused = await _refusal(bob.native.Infer(_infer(0), metadata=bob.metadata))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = _pushback_ms(refused)
        assert 0 < hint <= 1000 / rate
        assert (refused.details() or "").startswith(
            "principal 'bob' is over its rate limit (1 frames/s, bursts of 4); retry in "
        )
        # OIP ModelInfer draws on the same bucket; a batch of 3 is 3 frames.
        request = oip_request(MODEL, X[0], 0)
        refused = await _refusal(bob.oip.ModelInfer(request, metadata=bob.metadata))
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _pushback_ms(refused) > 0
        # Alice's bucket is her own: bob's flood leaves her calls alone.
        for row in range(int(BURST)):
            reply = await alice.native.Infer(_infer(row), metadata=alice.metadata)
            (y,) = reply.outputs
            np.testing.assert_allclose(
                np.frombuffer(y.data, np.float32),
                ort_full(MODEL, X[row : row + 1]).ravel(),
                rtol=0,
                atol=1e-5,
            )
        # Waiting as told is enough.
        await asyncio.sleep(hint / 1000)
        await bob.native.Infer(_infer(0), metadata=bob.metadata, timeout=5)
    finally:
        await alice.close()
        await bob.close()


async def test_streams_over_the_rate_are_slowed_not_refused(
    make_server: Callable[..., RunningServer],
) -> None:
    # Before: no rate limit at all; one tenant could send as fast as the server could batch.
    metrics_port = free_port()
    running = make_server(
        auth_tokens=TOKENS,
        rate_limit_frames=RATE,
        rate_limit_burst=BURST,
        metrics_port=metrics_port,
        metrics_per_principal=True,
    )
    alice, bob = (Tenant(running.target, token=f"{n}-token") for n in ("alice", "bob"))
    try:
        async with bob.stream() as s1, bob.stream() as s2, bob.stream() as s3, alice.stream() as a:
            streams = (s1, s2, s3)
            for i, stream in enumerate(streams):
                await stream.open(MODEL, f"b{i}")
            await a.open(MODEL, "a")
            started = time.monotonic()

            async def bob_floods(stream: RawStream, sid: str) -> list[F32]:
                return [await stream.frame(sid, k, FLOOD[k : k + 1]) for k in range(len(FLOOD))]

            bobs = [asyncio.ensure_future(bob_floods(s, f"b{i}")) for i, s in enumerate(streams)]
            # Alice sends meanwhile; her frames draw on her own bucket, never wait on bob's.
            mine = [await a.frame("a", k, X[k : k + 1]) for k in range(int(BURST))]
            outputs = await asyncio.gather(*bobs)
            elapsed = time.monotonic() - started
        np.testing.assert_allclose(
            np.concatenate(mine), ort_full(MODEL, X[: int(BURST)]), rtol=0, atol=1e-5
        )
        for flooded in outputs:
            np.testing.assert_allclose(
                np.concatenate(flooded), ort_full(MODEL, FLOOD), rtol=0, atol=1e-5
            )
        # The bucket admits BURST at once and RATE a second after: bob's 3 x 16 frames cannot
        # all have been read in less than (48 - BURST) / RATE seconds, whatever the machine.
        assert elapsed >= (3 * len(FLOOD) - BURST) / RATE
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f'rnnstream_principal_frames_total{{principal="bob"}} {3 * len(FLOOD):.1f}' in text
        assert f'rnnstream_principal_frames_total{{principal="alice"}} {BURST:.1f}' in text
        assert 'rnnstream_principal_sessions{principal="bob"} 3.0' in text
        throttled = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('rnnstream_principal_throttled_seconds_total{principal="bob"}')
        ]
        assert throttled and throttled[0] > 0
        assert 'rnnstream_principal_throttled_seconds_total{principal="alice"}' not in text
    finally:
        await alice.close()
        await bob.close()


async def test_per_principal_metrics_are_opt_in(make_server: Callable[..., RunningServer]) -> None:
    metrics_port = free_port()
    running = make_server(auth_tokens=TOKENS, metrics_port=metrics_port)
    bob = Tenant(running.target, token="bob-token")
    try:
        await bob.native.Infer(_infer(0), metadata=bob.metadata, timeout=5)
    finally:
        await bob.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert "rnnstream_frames_total" in text and "principal" not in text
