"""A TCP proxy on 127.0.0.1 that can cut every connection through it, for fault-injection tests."""

from __future__ import annotations

import asyncio
import threading


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to a target; `drop()` aborts every open connection at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.drops = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def drop(self) -> int:
        """Abort every connection through the proxy; returns how many were cut."""

        async def cut() -> int:
            writers = list(self._writers)
            for w in writers:
                w.transport.abort()
            self._writers.clear()
            return len(writers) // 2

        cut_count = asyncio.run_coroutine_threadsafe(cut(), self.loop).result(10)
        if cut_count:
            self.drops += 1
        return cut_count

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
