"""AsyncSession after its end: calls are refused at once instead of waiting forever."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from rnnstream import AsyncClient, RnnstreamError
from tests.conftest import RunningServer


async def test_ended_session_refuses_frames_and_controls(server: RunningServer) -> None:
    x = np.zeros(16, np.float32)
    async with AsyncClient(server.target) as client:
        session = await client.open("gru")
        await session.step(x)
        assert await session.end() == 1
        # A frame for the ended session, sent while another session opens on the same stream.
        results = await asyncio.wait_for(
            asyncio.gather(session.send(x), client.open("gru"), return_exceptions=True), 10
        )
        assert isinstance(results[0], RnnstreamError)
        assert results[0].code == grpc.StatusCode.NOT_FOUND
        other = results[1]
        assert not isinstance(other, BaseException)
        assert (await other.step(x))["y"].shape == (128,)
        with pytest.raises(RnnstreamError) as info:
            await asyncio.wait_for(session.end(), 10)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        await other.end()
