"""Run the HTTP server for one `STORAGE_PATH`."""

from __future__ import annotations

import logging
import sys

import uvicorn

from anvil.api.app import create_app
from anvil.runtime import Anvil


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
            app, host=host, port=port, loop="uvloop", http="httptools", access_log=False,
            log_level="warning", timeout_graceful_shutdown=5, server_header=False,
        )
        server = uvicorn.Server(config)
        print(f"Anvil {storage_path!s} listening on http://{host}:{port}", flush=True)
        print(f"  native API: http://{host}:{port}/anvil/v1/  (OpenAPI: /anvil/v1/openapi.json)", flush=True)
        print(f"  S3 gateway: http://{host}:{port}/  (path style; docs/s3.md)", flush=True)
        server.run()
    finally:
        anvil.close()
    sys.stdout.flush()
