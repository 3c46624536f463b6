"""The composition root: one opened `STORAGE_PATH` with every subsystem on top of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from anvil.diagnostics import Diagnostics
from anvil.identity import BucketAccess, IdentityService, install_bucket_lookup
from anvil.identity.settings import load_jwt_secret, load_keyring
from anvil.objects import ObjectService
from anvil.storage import Storage
from anvil.watch import WatchService

if TYPE_CHECKING:
    from anvil.backup.participant import Participant


def recovery_participants() -> list[Participant]:
    """Every subsystem's recovery participant; later subsystems append theirs here."""
    from anvil.backup.storage_participants import BlobsParticipant, JournalParticipant
    from anvil.diagnostics.backup_participant import DiagnosticsParticipant
    from anvil.identity.backup_participant import IdentityParticipant
    from anvil.objects.recovery import ObjectsParticipant
    from anvil.watch.backup_participant import WatchParticipant

    return [JournalParticipant(), ObjectsParticipant(), BlobsParticipant(), IdentityParticipant(),
            WatchParticipant(), DiagnosticsParticipant()]


class Anvil:
    def __init__(self, storage_path: str | Path, *, lock: bool = True, endpoint: str | None = None):
        self.storage = Storage(storage_path, lock=lock)
        try:
            self.objects = ObjectService(self.storage)
            secrets_dir = self.storage.layout.secrets
            self.identity = IdentityService(self.storage, load_keyring(secrets_dir), load_jwt_secret(secrets_dir))
            install_bucket_lookup(self._bucket_access)
            self.watch = WatchService(self.storage, bucket_exists=lambda b: self.objects.find_bucket(b) is not None)
            self.diagnostics = Diagnostics(self.storage, self.objects)
            self.storage.catalog.start()
            self.identity.bootstrap(endpoint)
        except BaseException:
            self.storage.close()
            raise

    def _bucket_access(self, name: str) -> BucketAccess | None:
        b = self.objects.find_bucket(name)
        return BucketAccess(b.tenant, b.public) if b is not None else None

    def participants(self) -> list[Participant]:
        return recovery_participants()

    def close(self) -> None:
        self.watch.close()
        self.storage.close()
