"""A TCP proxy in front of RabbitMQ for tests (an event loop in a thread): optionally
terminating TLS, and able to cut what goes through it.

``sever()`` drops the connections through it; ``refuse = True`` turns new ones away at once;
``handshakes`` counts the connections accepted (after the TLS handshake, with TLS).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from urllib.parse import urlsplit

from tests.integration.conftest import AMQP_URL

__all__ = ["RABBITMQ", "TcpProxy"]

#: Where the tests' RabbitMQ listens (plain AMQP).
_PARTS = urlsplit(AMQP_URL)
RABBITMQ = (_PARTS.hostname or "127.0.0.1", _PARTS.port or 5672)


class TcpProxy:
    """Accepts connections on a free port of 127.0.0.1 and forwards their bytes upstream."""

    def __init__(
        self, upstream: tuple[str, int] = RABBITMQ, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.upstream = upstream
        self.refuse = False
        self.handshakes = 0
        self._tls = tls
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._connect, "127.0.0.1", 0, ssl=self._tls)

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def sever(self) -> None:
        """Drop every connection going through the proxy now."""

        def close_all() -> None:
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        self.sever()

        async def stop() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
