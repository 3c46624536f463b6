"""Run the HTTP server for one `STORAGE_PATH`."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from anvil.api.app import create_app
from anvil.runtime import Anvil


class _CoalescingTransport:
    """Collects a connection's writes made in one event-loop step and sends them together.

    uvicorn writes a response's head and body separately: two send() calls, two loopback
    segments, two wake-ups of the client. For small responses that doubled the kernel cost of
    each request (measured: send() was half the server's GIL time in the small-GET benchmark).
    Writes are deferred to the end of the current loop step, then handed over as one writev.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, lines: list[bytes]) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending or self._transport.is_closing():
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        else:
            self._transport.writelines(pending)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._pending)

    def close(self) -> None:
        self._flush()  # a response written just before close must still go out
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body of a response sent in one write."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def parse_listen(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(storage_path: str, listen: str) -> None:
    host, port = parse_listen(listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    anvil = Anvil(storage_path)
    try:
        app = create_app(anvil)
        config = uvicorn.Config(
            app, host=host, port=port, loop="uvloop", http=CoalescingHttpToolsProtocol, access_log=False,
            log_level="warning", timeout_graceful_shutdown=5, server_header=False,
        )
        server = uvicorn.Server(config)
        print(f"Anvil {storage_path!s} listening on http://{host}:{port}", flush=True)
        print(f"  native API: http://{host}:{port}/anvil/v1/  (OpenAPI: /anvil/v1/openapi.json)", flush=True)
        server.run()
    finally:
        anvil.close()
    sys.stdout.flush()
