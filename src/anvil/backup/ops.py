"""Entry points shared by the CLI, the admin API and the scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anvil.backup import engine, mode
from anvil.backup.backends import open_backend
from anvil.backup.crypto import read_passphrase
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.storage import Storage
from anvil.storage.recovery import Participant


def open_repo(url: str, *, passphrase: str | None = None, key_file: str | None = None,
              s3_endpoint: str | None = None, storage_path: str | Path | None = None) -> Repository:
    backend = open_backend(url, s3_endpoint=s3_endpoint, storage_path=storage_path)
    return Repository.open(backend, passphrase or read_passphrase(key_file))


def backup_storage(storage: Storage, participants: list[Participant], repo: Repository, *,
                   progress: engine.Progress | None = None, tag: str | None = None, run_mode: str = "offline",
                   escrow_secrets: bool | None = None, incremental: bool = False) -> dict[str, Any]:
    """A snapshot of one opened deployment (the running server's, or one opened offline).

    `incremental`: a journal delta (what changed since the newest snapshot, read from the journal)
    instead of a full snapshot; see `archive.create_delta`."""
    root = storage.root
    url = repo.backend.url
    if url.startswith("file://"):
        # Checked again here because the server path may differ from the CLI's view.
        open_backend(url, storage_path=root)
    layout = storage.layout
    config = {"storage_path": str(root), "mode": run_mode, "repository": url, "escrow_secrets": escrow_secrets}
    if incremental:
        from anvil.backup.archive import create_delta

        return create_delta(storage, participants, repo, tag=tag, config={**config, "incremental": True},
                            progress=progress)
    return engine.create_snapshot(root, layout.catalog_path, storage.blobs, layout.tmp,
                                  storage.format.deployment_id, participants, repo,
                                  progress=progress, tag=tag, config=config, escrow_secrets=escrow_secrets)


def _stopped_store(storage_path: str | Path) -> Storage:
    if not (Path(storage_path) / "FORMAT").exists():
        raise BackupError(f"{storage_path} is not an Anvil storage path (no FORMAT)")
    return Storage(storage_path)


def validate_path(storage_path: str | Path, participants: list[Participant]) -> dict[str, Any]:
    """Offline validation of a (restored) STORAGE_PATH; the server must be stopped."""
    storage = _stopped_store(storage_path)
    try:
        return mode.validate(storage, participants)
    finally:
        storage.close()


def resume_path(storage_path: str | Path, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
    storage = _stopped_store(storage_path)
    try:
        return mode.resume(storage, force=force, reason=reason)
    finally:
        storage.close()
