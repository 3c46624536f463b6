"""Run the HTTP server for one `STORAGE_PATH`."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from anvil.api.app import create_app
from anvil.errors import AnvilError
from anvil.identity.settings import dev_auth_enabled, is_development
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


def _print_dev_credentials(anvil: Anvil, endpoint: str) -> None:
    cred = anvil.identity.ensure_dev_app(endpoint)
    admin = anvil.storage.layout.bootstrap / "first-admin.json"
    cid, secret = cred["client_id"], cred["client_secret"]
    print(
        "Development mode: a ready application of tenant 'dev' "
        f"(kept in {anvil.storage.layout.bootstrap / 'dev-app.json'}):\n"
        f"  endpoint:      {endpoint}\n"
        f"  client_id:     {cid}\n"
        f"  client_secret: {secret}\n"
        f"  CLI:   ANVIL_ENDPOINT={endpoint} ANVIL_CLIENT_ID={cid} ANVIL_CLIENT_SECRET={secret} anvil bucket ls\n"
        f"  aws:   AWS_ACCESS_KEY_ID={cid} AWS_SECRET_ACCESS_KEY={secret} AWS_DEFAULT_REGION=us-east-1 "
        f"aws --endpoint-url {endpoint} s3 ls\n"
        f"  admin credential: {admin}",
        flush=True,
    )


def serve(storage_path: str, listen: str, *, dev_auth: bool = False, backup: Any = None) -> None:
    """Serve one STORAGE_PATH; `backup` (a ScheduleConfig) turns on scheduled backups."""
    host, port = parse_listen(listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev_auth = dev_auth or dev_auth_enabled()
    if dev_auth and not is_development():
        raise AnvilError("InvalidArgument", "--dev-auth is refused outside development mode")
    endpoint = f"http://{host}:{port}"
    anvil = Anvil(storage_path, endpoint=endpoint)
    anvil.storage.clear_tmp()
    try:
        from anvil.backup.mode import in_recovery

        recovery_mode = in_recovery(anvil.storage.root)
        app = create_app(anvil, recovery_mode=recovery_mode, dev_auth=dev_auth)
        anvil.watch.start_background()
        config = uvicorn.Config(
            app, host=host, port=port, loop="uvloop", http=CoalescingHttpToolsProtocol, access_log=False,
            log_level="warning", timeout_graceful_shutdown=5, server_header=False,
        )
        server = uvicorn.Server(config)
        scheduler = None
        if backup is not None:
            from anvil.api.backup_routes import run_backup
            from anvil.backup.schedule import BackupScheduler, check_schedule

            check_schedule(backup, anvil.storage.root)
            scheduler = BackupScheduler(app, backup, run_backup)
            scheduler.start()
        print(f"Anvil {storage_path!s} listening on {endpoint}", flush=True)
        print(f"  native API: {endpoint}/anvil/v1/  (OpenAPI: /anvil/v1/openapi.json)", flush=True)
        print(f"  S3 gateway: {endpoint}/  (path style; docs/s3.md)", flush=True)
        if recovery_mode:
            print("  RECOVERY MODE: restored storage; public writes are refused until "
                  "`anvil recovery validate` + `anvil recovery resume`", flush=True)
        if is_development() and not recovery_mode:  # recovery mode writes nothing, not even a dev app
            _print_dev_credentials(anvil, endpoint)
        if dev_auth:
            banner = "!" * 78
            print(f"{banner}\nWARNING: --dev-auth: requests WITHOUT a token act as the development admin "
                  f"principal.\nFor benchmarks only; never expose this server.\n{banner}", file=sys.stderr, flush=True)
        try:
            server.run()
        finally:
            if scheduler is not None:
                scheduler.stop()
    finally:
        anvil.close()
    sys.stdout.flush()
