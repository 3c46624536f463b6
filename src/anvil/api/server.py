"""Run the HTTP server for one `STORAGE_PATH`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import uvicorn

from anvil.api.app import create_app
from anvil.runtime import Anvil


def parse_listen(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(storage_path: str, listen: str, *, backup: Any = None) -> None:
    """Serve one STORAGE_PATH; `backup` (a ScheduleConfig) turns on scheduled backups."""
    host, port = parse_listen(listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    anvil = Anvil(storage_path)
    try:
        from anvil.backup.recovery import in_recovery

        recovery_mode = in_recovery(anvil.storage.root)
        app = create_app(anvil, recovery_mode=recovery_mode)
        config = uvicorn.Config(
            app, host=host, port=port, loop="uvloop", http="httptools", access_log=False,
            log_level="warning", timeout_graceful_shutdown=5, server_header=False,
        )
        server = uvicorn.Server(config)
        scheduler = None
        if backup is not None:
            from anvil.backup.schedule import BackupScheduler, check_schedule

            check_schedule(backup, anvil.storage.root)
            scheduler = BackupScheduler(app, backup)
            scheduler.start()
        print(f"Anvil {storage_path!s} listening on http://{host}:{port}", flush=True)
        print(f"  native API: http://{host}:{port}/anvil/v1/  (OpenAPI: /anvil/v1/openapi.json)", flush=True)
        if recovery_mode:
            print("  RECOVERY MODE: restored storage; public writes are refused until "
                  "`anvil recovery validate` + `anvil recovery resume`", flush=True)
        try:
            server.run()
        finally:
            if scheduler is not None:
                scheduler.stop()
    finally:
        anvil.close()
    sys.stdout.flush()
