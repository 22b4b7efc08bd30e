"""A relay some milliseconds away: a TCP proxy on loopback in front of an SMTP server.

Each chunk the server writes reaches the client ``delay_s`` later (in order, without
adding up), so a client waits one round trip per wait for a reply, as with a relay across
a network. The proxy counts the connections open through it now and at most
(``open``, ``peak``) and, with ``refuse`` set, answers new connections itself with
``421`` and closes them (a relay turning connections away). Used by the tests and by
``bench/``; nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import threading

from postroom.dev.embedded_redis import free_port

LOOPBACK = "127.0.0.1"
REFUSAL = b"421 4.3.2 too many connections, try again later\r\n"


class DelayProxy:
    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.port = free_port()
        self.open = 0
        self.peak = 0
        self.accepted = 0  # connections passed on to the server
        self.refused = 0  # connections answered 421
        self.refuse = False
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def reset_peak(self) -> None:
        self.peak = self.open

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, LOOPBACK, self.port, backlog=512)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        if self.refuse:
            self.refused += 1
            loop.call_later(self.delay_s, writer.write, REFUSAL)
            loop.call_later(self.delay_s, writer.close)
            return
        self.accepted += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.upstream_port)
        except OSError:
            self.open -= 1
            writer.close()
            return

        async def to_relay() -> None:
            try:
                while data := await reader.read(65536):
                    up_writer.write(data)
            finally:
                up_writer.close()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                loop.call_later(self.delay_s, writer.write, data)
            loop.call_later(self.delay_s, writer.close)

        try:
            await asyncio.gather(to_relay(), to_client(), return_exceptions=True)
        finally:
            self.open -= 1
