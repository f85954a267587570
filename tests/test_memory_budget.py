"""The memory budget (--max-buffered-bytes): a client that writes and never reads, output rings,
concurrent unary calls and a huge stateless OIP batch each hold a bounded number of bytes, and
what they held is given back. Raw stubs, as a hostile client would send them; RSS itself is
measured from outside by bench/hostile.py."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests import probe
from tests.conftest import RunningServer
from tests.server_process import free_port
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

MODEL = "gru"
MIB = 1024 * 1024
FRAME_COST = 1024 * 16 * 4 + 1024 * 128 * 4  # T=1024: 64 KiB in, 512 KiB out


def _held(running: RunningServer) -> int:
    return int(running.run(lambda: running.engine.budget.held()))


async def _stalled(written: Callable[[], int], rounds: int = 30) -> None:
    """Return once the writes have not moved for `rounds` polls in a row."""
    previous, still = -1, 0
    while still < rounds:
        await asyncio.sleep(0.01)
        still = still + 1 if written() == previous else 0
        previous = written()


async def test_a_client_that_never_reads_holds_a_bounded_share(
    make_server: Callable[..., RunningServer],
) -> None:
    """One stream, 50 sessions, T=1024 frames written and no answer read: the server stops
    reading that stream once it holds its share (an eighth of the budget), serves another
    stream meanwhile, and gives everything back when the client leaves."""
    budget = 64 * MIB
    running = make_server(models=(MODEL,), max_buffered_bytes=budget, max_sessions_per_stream=64)
    x = sequence(MODEL, 1024, seed=180)
    received = running.server.metrics.bytes_received
    async with RawStream(running.target) as hostile:
        sids = [(await hostile.open(MODEL)).session_id for _ in range(50)]
        written = 0

        async def write_all() -> None:
            nonlocal written
            for i in range(40):
                for sid in sids:
                    await hostile.call.write(frame_request(sid, i, x_tensor(x)))
                    written += 1

        writer = asyncio.create_task(write_all())
        await _stalled(lambda: written)
        assert not writer.done(), "every write went through without a read"
        frames_read = received.value // x.nbytes
        # Its share, plus the frame read while it still had room, plus the answers already
        # handed to gRPC before flow control stopped them.
        assert frames_read <= (budget // 8) // FRAME_COST + 1 + 16, frames_read
        work, rings = running.run(
            lambda: (running.engine.budget.work, running.engine.budget.rings.held)
        )
        assert work <= budget // 8 + FRAME_COST  # its frames and unread answers
        assert rings <= budget // 4  # the outputs its sessions' rings keep
        # Another client of the same principal is served all the while.
        async with RawStream(running.target) as polite:
            sid = (await polite.open(MODEL)).session_id
            y = await asyncio.wait_for(polite.frame(sid, 0, x[:8]), 30)
        np.testing.assert_allclose(y, ort_full(MODEL, x[:8]), rtol=0, atol=1e-5)
        writer.cancel()
    # The client left: what its stream held is given back (its frames still queued are
    # answered into the void, their bytes with them); its sessions live on, rings and all.
    for _ in range(500):
        if running.run(lambda: running.engine.budget.work) == 0:
            break
        await asyncio.sleep(0.01)
    assert running.run(lambda: running.engine.budget.work) == 0
    assert running.run(lambda: running.engine.budget.rings.held) <= budget // 4


async def test_output_rings_are_bounded_by_bytes(
    make_server: Callable[..., RunningServer],
) -> None:
    """Each ring keeps at most --output-ring-bytes (its newest output always), all rings at
    most a quarter of the budget, the oldest outputs server-wide going first; a resend of an
    output no longer kept is refused, one still kept is answered."""
    running = make_server(
        models=(MODEL,), output_ring_bytes=4 * MIB, max_buffered_bytes=16 * MIB, output_ring=64
    )
    x = sequence(MODEL, 4096, seed=181)  # 2 MiB of output per frame
    async with RawStream(running.target) as raw:
        sids = [(await raw.open(MODEL)).session_id for _ in range(4)]
        for sid in sids:
            for i in range(3):
                await raw.frame(sid, i, x)
        rings = running.run(lambda: running.engine.budget.rings.held)
        assert rings <= 4 * MIB
        refused = await raw.error(frame_request(sids[0], 0, x_tensor(x)))
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "no longer kept" in refused.message and "--output-ring-bytes" in refused.message
        # The newest output of the session that ran last is still kept: answered, not rerun.
        frames = running.run(lambda: running.engine.model_stats(MODEL).frames)
        again = await raw.frame(sids[-1], 2, x)
        assert running.run(lambda: running.engine.model_stats(MODEL).frames) == frames
        np.testing.assert_allclose(
            again, ort_full(MODEL, np.concatenate([x] * 3))[-4096:], atol=1e-4
        )
        for sid in sids:
            await raw.request(pb.StreamRequest(end=pb.EndSessionRequest(session_id=sid)))
    assert running.run(lambda: running.engine.budget.rings.held) == 0


async def test_concurrent_unary_calls_past_the_budget_are_refused(
    make_server: Callable[..., RunningServer],
) -> None:
    """100 stateless Infer calls of T=4096 at once (2.3 MB each) against a 64 MiB budget: the
    ones that fit run and are answered, the rest are refused at once with RESOURCE_EXHAUSTED
    naming the limit."""
    running = make_server(models=(MODEL,), max_buffered_bytes=64 * MIB)
    x = sequence(MODEL, 4096, seed=182)
    release = threading.Event()
    probe.block_ort(running.engine, release)  # the admitted calls stay in the engine
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.RnnstreamStub(channel)
            calls = [
                asyncio.ensure_future(
                    stub.Infer(pb.InferRequest(model=MODEL, inputs=[x_tensor(x)]), timeout=60)
                )
                for _ in range(100)
            ]
            await asyncio.sleep(0.5)
            assert _held(running) <= 64 * MIB
            release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        release.set()
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert refused and answered
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert all("--max-buffered-bytes" in (r.details() or "") for r in refused)
    assert len(answered) * (x.nbytes * 9) <= 64 * MIB  # each held its input and 8x as output
    np.testing.assert_allclose(decode(answered[0].outputs[0]), ort_full(MODEL, x), atol=1e-4)
    assert _held(running) == 0


def _stateless(batch: int, steps: int) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[batch, steps, 16])
    request.raw_input_contents.append(bytes(batch * steps * 16 * 4))
    return request


@pytest.mark.parametrize(
    ("batch", "steps", "budget", "code", "named"),
    [
        (100_000, 1, 256 * MIB, grpc.StatusCode.INVALID_ARGUMENT, "max_batch_size of 256"),
        (200, 1024, 256 * MIB, grpc.StatusCode.INVALID_ARGUMENT, "--max-message-bytes"),
        (100, 256, 8 * MIB, grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-buffered-bytes"),
    ],
)
def test_a_stateless_batch_is_checked_whole_before_it_runs(
    make_server: Callable[..., RunningServer],
    batch: int,
    steps: int,
    budget: int,
    code: grpc.StatusCode,
    named: str,
) -> None:
    running = make_server(models=(MODEL,), max_buffered_bytes=budget, max_message_bytes=64 * MIB)
    with grpc.insecure_channel(running.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_stateless(batch, steps), timeout=60)
    assert refused.value.code() == code and named in (refused.value.details() or "")
    assert running.run(lambda: running.engine.model_stats(MODEL).frames) == 0  # nothing ran
    assert _held(running) == 0


def test_the_budget_is_a_metric(make_server: Callable[..., RunningServer]) -> None:
    port = free_port()
    make_server(models=(MODEL,), metrics_port=port, max_buffered_bytes=32 * MIB)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert 'rnnstream_buffered_bytes{kind="work"} 0.0' in text
    assert 'rnnstream_buffered_bytes{kind="rings"} 0.0' in text
    limit = next(
        line for line in text.splitlines() if line.startswith("rnnstream_buffered_bytes_limit ")
    )
    assert float(limit.split()[1]) == 32 * MIB
