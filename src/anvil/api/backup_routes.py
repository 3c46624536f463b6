"""Admin routes for backup and recovery: translation and authorisation only."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil.api.common import blocking, endpoint, model_body, release_memory
from anvil.api_models import ArchiveRequest, CreateBackupRequest, HealBlobsRequest, ResumeRequest
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.storage import leases

_backup_lock = threading.Lock()


def run_backup(app: Any, repo_url: str, **options: Any) -> dict[str, Any]:
    """One backup of the running server (the admin API's and the scheduler's), on a thread of its own
    that ends with it; then the memory it freed is handed back (`api.common.release_memory`).

    What a thread keeps for its later calls (its zstd contexts, ~2 MiB once it has compressed a
    manifest; its catalog reader connection and page cache; AES-GCM objects) would otherwise stay
    with the pool thread that ran the backup, among whatever it did next, and the allocator could
    not give those pages back: the server stayed a few MiB above its idle figure after every backup
    (docs/backup.md, "Back to idle"). A thread's start is ~0.1 ms of a backup's hundreds."""
    own = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="anvil-backup")
    try:
        return own.submit(_run_backup, app, repo_url, **options).result()
    finally:
        own.shutdown(wait=True)  # the thread has ended: what it held per thread is freed
        # After the answer is sent: a full collection and malloc_trim were a tenth of a second of
        # every backup's reply.
        threading.Thread(target=release_memory, name="anvil-backup-release", daemon=True).start()


def _run_backup(app: Any, repo_url: str, *, passphrase: str | None = None, key_file: str | None = None,
                s3_endpoint: str | None = None, tag: str | None = None, mode: str = "online",
                escrow_secrets: bool | None = None, incremental: bool = False) -> dict[str, Any]:
    """One backup; remembers the outcome for /anvil/health/ready."""
    from anvil.backup import engine, ops
    from anvil.backup.errors import BackupError

    anvil = app.state.anvil
    try:
        # Bad input (no repository there, a wrong passphrase, a repository inside STORAGE_PATH) is
        # refused before the lock: a scheduled backup that happens to be running does not hide it.
        repo = ops.open_repo(repo_url, passphrase=passphrase, key_file=key_file, s3_endpoint=s3_endpoint,
                             storage_path=anvil.storage.root)
    except BackupError as e:
        app.state.last_backup = {"time": time.time(), "ok": False, "error": str(e), "repository": repo_url}
        raise AnvilError("InvalidArgument", str(e)) from None
    if not _backup_lock.acquire(blocking=False):
        raise AnvilError("PreconditionFailed", "a backup is already running")
    started = time.time()
    # What `/anvil/health/ready` shows as `backup.running` while this runs: the CLI's progress bar.
    running = {"started": started, "repository": repo_url, "bytes_done": 0, "bytes_total": None,
               "incremental": incremental}
    app.state.backup_running = running

    def progress(done: int, total: int, _what: str) -> None:
        running["bytes_done"], running["bytes_total"] = done, total

    try:
        manifest = ops.backup_storage(anvil.storage, anvil.participants(), repo, tag=tag, run_mode=mode,
                                      escrow_secrets=escrow_secrets, incremental=incremental, progress=progress,
                                      participants_factory=anvil.participants_factory)
        result = {**engine.snapshot_row(manifest), "stats": manifest["stats"], "problems": manifest["problems"]}
        app.state.last_backup = {"time": started, "ok": not manifest["problems"], "snapshot": manifest["id"],
                                 "repository": repo.backend.url, "problems": len(manifest["problems"])}
        return result
    except BackupError as e:
        app.state.last_backup = {"time": started, "ok": False, "error": str(e), "repository": repo_url}
        raise AnvilError("InvalidArgument", str(e)) from None
    except Exception as e:
        app.state.last_backup = {"time": started, "ok": False, "error": f"{type(e).__name__}: {e}",
                                 "repository": repo_url}
        raise
    finally:
        app.state.backup_running = None
        _backup_lock.release()


def start_archiver(app: Any, config: Any) -> Any:
    """Continuous archiving (`anvil serve --archive-repo`): refuses to start on a wrong repository or
    passphrase; afterwards an unreachable repository only shows as lag and `last_error`."""
    from anvil.backup import ops
    from anvil.backup.archive import Archiver
    from anvil.backup.errors import BackupError

    anvil = app.state.anvil

    def open_repo() -> Any:
        return ops.open_repo(config.repo, passphrase=config.passphrase, s3_endpoint=config.s3_endpoint,
                             storage_path=anvil.storage.root)

    try:
        open_repo()
    except BackupError as e:
        raise AnvilError("InvalidArgument", f"--archive-repo: {e}") from None
    archiver = Archiver(anvil.storage, anvil.participants(), config, open_repo)
    archiver.guard = anvil.leases.guard(leases.ARCHIVE)
    app.state.archiver = archiver
    archiver.start()
    return archiver


def archive_status(app: Any) -> dict[str, Any]:
    archiver = getattr(app.state, "archiver", None)
    return archiver.status() if archiver is not None else {"enabled": False}


@endpoint
async def get_archive(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    return JSONResponse(await blocking(archive_status, request.app))


@endpoint
async def configure_archive(request: Request, ctx: RequestContext) -> Response:
    """Turn continuous archiving on at runtime (admin): {repo, passphrase?, interval_seconds?, s3_endpoint?}.
    The passphrase defaults to the server's ANVIL_BACKUP_PASSPHRASE, as for online backups."""
    from anvil.backup.archive import ArchiveConfig
    from anvil.backup.crypto import read_passphrase
    from anvil.backup.errors import BackupError

    authorize(ctx.principal, "admin:write", "system")
    body = await model_body(request, ArchiveRequest)
    if getattr(request.app.state, "archiver", None) is not None:
        raise AnvilError("PreconditionFailed", "continuous archiving is already running: stop it first "
                                               "(DELETE /anvil/v1/admin/archive)")
    try:
        passphrase = body.passphrase or read_passphrase(None)
    except BackupError as e:
        raise AnvilError("InvalidArgument", str(e)) from None
    config = ArchiveConfig(body.repo, float(body.interval_seconds), passphrase, body.s3_endpoint or None)
    archiver = await blocking(start_archiver, request.app, config)
    return JSONResponse(archiver.status(), status_code=201)


@endpoint
async def stop_archive(request: Request, ctx: RequestContext) -> Response:
    """Turn continuous archiving off (admin); what is unshipped is shipped first when the repository answers."""
    authorize(ctx.principal, "admin:write", "system")
    archiver = getattr(request.app.state, "archiver", None)
    if archiver is None:
        raise AnvilError("PreconditionFailed", "continuous archiving is not running")
    request.app.state.archiver = None
    await blocking(lambda: archiver.stop(release=True))  # switched off: its hold goes too
    return JSONResponse({**archiver.status(), "enabled": False})


@endpoint
async def flush_archive(request: Request, ctx: RequestContext) -> Response:
    """Ship everything up to the current head now (admin): what `anvil backup status --flush` and tests use."""
    authorize(ctx.principal, "admin:write", "system")
    archiver = getattr(request.app.state, "archiver", None)
    if archiver is None:
        raise AnvilError("PreconditionFailed", "continuous archiving is not configured (anvil serve --archive-repo)")
    try:
        shipped = await blocking(archiver.catch_up)
    except Exception as e:  # noqa: BLE001 - reported as the status's last_error too
        archiver._failed(e)
        raise AnvilError("PreconditionFailed", f"archive flush failed: {archiver.last_error}") from None
    return JSONResponse({"shipped": shipped, **archiver.status()})


@endpoint
async def create_backup(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    body = await model_body(request, CreateBackupRequest)
    # escrow_secrets absent: the default policy (development-mode keys are escrowed, production ones are not).
    result = await blocking(run_backup, request.app, body.repo, passphrase=body.passphrase or None,
                            s3_endpoint=body.s3_endpoint or None, tag=body.tag or None,
                            escrow_secrets=body.escrow_secrets, incremental=body.incremental)
    return JSONResponse(result, status_code=201)


def run_heal(app: Any, ctx: RequestContext, repo_url: str, *, passphrase: str | None = None,
             s3_endpoint: str | None = None, snapshot: str | None = None) -> dict[str, Any]:
    """`anvil repair blobs --from-backup` inside the server: it opens the repository itself."""
    from anvil.backup import ops
    from anvil.backup.errors import BackupError

    anvil = app.state.anvil
    try:
        repo = ops.open_repo(repo_url, passphrase=passphrase, s3_endpoint=s3_endpoint,
                             storage_path=anvil.storage.root)
        return anvil.heal_blobs(ctx, repo, snapshot=snapshot)
    except BackupError as e:
        raise AnvilError("InvalidArgument", str(e)) from None


@endpoint
async def heal_blobs(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    body = await model_body(request, HealBlobsRequest)
    result = await blocking(run_heal, request.app, ctx, body.repo, passphrase=body.passphrase,
                            s3_endpoint=body.s3_endpoint, snapshot=body.snapshot)
    return JSONResponse(result)


@endpoint
async def recovery_status(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    from anvil.backup import mode

    root = request.app.state.anvil.storage.root
    return JSONResponse({"recovery_mode": bool(request.app.state.recovery_mode),
                         "marker": mode.read_marker(root), "last_validation": mode.last_validation(root)})


@endpoint
async def recovery_validate(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    from anvil.backup import mode

    anvil = request.app.state.anvil
    report = await blocking(mode.validate, anvil.storage, anvil.participants())
    return JSONResponse(report)


@endpoint
async def recovery_resume(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:write", "system")
    from anvil.backup import mode
    from anvil.backup.errors import BackupError

    body = await model_body(request, ResumeRequest, required=False)
    try:
        result = await blocking(mode.resume, request.app.state.anvil.storage, force=body.force, reason=body.reason,
                                actor=ctx.actor)
    except BackupError as e:
        raise AnvilError("PreconditionFailed", str(e)) from None
    request.app.state.recovery_mode = False
    return JSONResponse(result)


BACKUP_ROUTES = [
    Route("/anvil/v1/admin/backup", create_backup, methods=["POST"]),
    Route("/anvil/v1/admin/archive", get_archive, methods=["GET"]),
    Route("/anvil/v1/admin/archive", configure_archive, methods=["POST"]),
    Route("/anvil/v1/admin/archive", stop_archive, methods=["DELETE"]),
    Route("/anvil/v1/admin/archive/flush", flush_archive, methods=["POST"]),
    Route("/anvil/v1/admin/repair/blobs", heal_blobs, methods=["POST"]),
    Route("/anvil/v1/admin/recovery", recovery_status, methods=["GET"]),
    Route("/anvil/v1/admin/recovery/validate", recovery_validate, methods=["POST"]),
    Route("/anvil/v1/admin/recovery/resume", recovery_resume, methods=["POST"]),
]
