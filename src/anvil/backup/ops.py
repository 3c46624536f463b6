"""Entry points shared by the CLI, the admin API and the scheduler."""

from __future__ import annotations

import os
import platform
import uuid
from pathlib import Path
from typing import Any

from anvil.backup import engine, mode
from anvil.backup.backends import open_backend
from anvil.backup.crypto import read_passphrase
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.storage import Storage, holds
from anvil.storage.leases import ttl_from_env
from anvil.storage.recovery import Participant


def open_repo(url: str, *, passphrase: str | None = None, key_file: str | None = None,
              s3_endpoint: str | None = None, storage_path: str | Path | None = None) -> Repository:
    backend = open_backend(url, s3_endpoint=s3_endpoint, storage_path=storage_path)
    return Repository.open(backend, passphrase or read_passphrase(key_file))


def backup_storage(storage: Storage, participants: list[Participant], repo: Repository, *,
                   progress: engine.Progress | None = None, tag: str | None = None, run_mode: str = "offline",
                   escrow_secrets: bool | None = None, incremental: bool = False,
                   participants_factory: str | None = None) -> dict[str, Any]:
    """A snapshot of one opened deployment (the running server's, or one opened offline).

    `incremental`: a journal delta (what changed since the newest snapshot, read from the journal)
    instead of a full snapshot; see `archive.create_delta`. `participants_factory` (the runtime's,
    "module:function"): an online full snapshot runs after its checkpoint in a child process
    (`backup.snapshot_process`), so the server's memory is back to idle afterwards; an offline
    one runs in this process, which exits anyway."""
    root = storage.root
    url = repo.backend.url
    if url.startswith("file://"):
        # Checked again here because the server path may differ from the CLI's view.
        open_backend(url, storage_path=root)
    config = {"storage_path": str(root), "mode": run_mode, "repository": url, "escrow_secrets": escrow_secrets}
    records_url = getattr(storage, "records_url", None)
    if records_url:
        from anvil.storage.pg import redact_url

        config["records"] = redact_url(records_url)  # PostgreSQL: the snapshot is an exported one (pgcapture)
    if run_mode == "offline":
        # A stopped store: no gc or compaction can run beside it (the lock), and nothing is written to it.
        return _backup(storage, participants, repo, config, progress, tag, escrow_secrets, incremental, None)
    # While it runs, gc (on any node) deletes no blob and compaction keeps what follows its start:
    # the snapshot may reference blobs that lose their last reference before they are read.
    with holds.holding(storage.catalog, f"backup/{uuid.uuid4().hex[:12]}", holder=f"{platform.node()}/{os.getpid()}",
                       seq=storage.catalog.head()[0], blobs=holds.ALL, ttl=ttl_from_env()):
        return _backup(storage, participants, repo, config, progress, tag, escrow_secrets, incremental,
                       participants_factory)


def _backup(storage: Storage, participants: list[Participant], repo: Repository, config: dict[str, Any],
            progress: engine.Progress | None, tag: str | None, escrow_secrets: bool | None,
            incremental: bool, participants_factory: str | None) -> dict[str, Any]:
    if incremental:
        from anvil.backup.archive import create_delta

        return create_delta(storage, participants, repo, tag=tag, config={**config, "incremental": True},
                            progress=progress)
    records_url = getattr(storage, "records_url", None)
    return engine.create_snapshot(storage.root, records_url or storage.layout.catalog_path, storage.blobs,
                                  storage.layout.tmp, storage.format.deployment_id, participants, repo,
                                  progress=progress, tag=tag, config=config, escrow_secrets=escrow_secrets,
                                  participants_factory=participants_factory)


def _stopped_store(storage_path: str | Path, records: str | None = None) -> Storage:
    if not (Path(storage_path) / "FORMAT").exists():
        raise BackupError(f"{storage_path} is not an Anvil storage path (no FORMAT)")
    loaded_into = (mode.read_marker(Path(storage_path)) or {}).get("records")
    if loaded_into and not records:
        # Opened without it, the path would get a new, empty catalog.db and fail every comparison.
        raise BackupError(f"the records of {storage_path} were restored into the PostgreSQL store {loaded_into}: "
                          "give --records URL")
    return Storage(storage_path, records=records)


def validate_path(storage_path: str | Path, participants: list[Participant], *,
                  records: str | None = None) -> dict[str, Any]:
    """Offline validation of a (restored) STORAGE_PATH; the server must be stopped. `records`: the
    PostgreSQL store a restore loaded (`anvil restore --records`): validation runs on that engine."""
    storage = _stopped_store(storage_path, records)
    try:
        return mode.validate(storage, participants)
    finally:
        storage.close()


def resume_path(storage_path: str | Path, *, force: bool = False, reason: str | None = None,
                records: str | None = None) -> dict[str, Any]:
    storage = _stopped_store(storage_path, records)
    try:
        return mode.resume(storage, force=force, reason=reason)
    finally:
        storage.close()
