"""The client connects over a link whose handshake takes longer than its reconnect backoff."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from rnnstream import Client
from tests.conftest import RunningServer

SERVER_DELAY = 0.5  # seconds before the server's first bytes (its HTTP/2 SETTINGS) reach the client


class SlowLink:
    """A TCP relay on 127.0.0.1 that holds back the server's first bytes on each connection, as
    a long round trip or a busy server does; everything after flows at once."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers |= {client_w, server_w}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            first = True
            try:
                while data := await src.read(65536):
                    if first and delay:
                        await asyncio.sleep(delay)
                    first = False
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(client_r, server_w, 0.0), pump(server_r, client_w, SERVER_DELAY))

    def close(self) -> None:
        async def stop() -> None:
            # Closing the sockets ends the relays by themselves (a cancelled connection callback
            # would log its CancelledError on Python 3.11).
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def slow_link(server: RunningServer) -> Iterator[SlowLink]:
    link = SlowLink(server.port)
    yield link
    link.close()


def test_first_call_waits_for_a_slow_handshake(slow_link: SlowLink) -> None:
    # The client's reconnect backoff (100 ms at first) must not also cap how long a connection
    # attempt may take: with grpc.min_reconnect_backoff_ms=100 the first call failed with
    # UNAVAILABLE "connection attempt timed out before receiving SETTINGS frame".
    with Client(f"127.0.0.1:{slow_link.port}") as client:
        names = {model.name for model in client.list_models()}
    assert "gru" in names
