"""The composition root: one opened `STORAGE_PATH` with every subsystem on top of it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from anvil.authz import AuthzService
from anvil.authz.participant import AuthzParticipant
from anvil.diagnostics import Diagnostics
from anvil.diagnostics.participant import DiagnosticsParticipant
from anvil.diagnostics.service import check_storage_path
from anvil.errors import AnvilError
from anvil.identity import BucketAccess, IdentityService, install_bucket_lookup
from anvil.identity.participant import IdentityParticipant
from anvil.identity.settings import load_jwt_secret, load_keyring
from anvil.objects import ObjectService
from anvil.objects.participant import ObjectsParticipant
from anvil.storage import Storage
from anvil.storage.layout import FORMAT_FILE
from anvil.storage.participant import BlobsParticipant, JournalParticipant, StorageParticipant
from anvil.storage.recovery import Participant
from anvil.watch import WatchService
from anvil.watch.participant import WatchParticipant


def recovery_participants() -> list[Participant]:
    """Every subsystem's recovery participant, in the order reports list them; a new subsystem
    appends its own here and thereby joins backup, restore, fsck, gc, the drill and the
    conformance suite."""
    return [StorageParticipant(), JournalParticipant(), ObjectsParticipant(), BlobsParticipant(),
            IdentityParticipant(), WatchParticipant(), DiagnosticsParticipant(), AuthzParticipant()]


class Anvil:
    def __init__(self, storage_path: str | Path, *, lock: bool = True, endpoint: str | None = None):
        self.storage = Storage(storage_path, lock=lock)
        try:
            self.objects = ObjectService(self.storage)
            secrets_dir = self.storage.layout.secrets
            self.identity = IdentityService(self.storage, load_keyring(secrets_dir), load_jwt_secret(secrets_dir))
            install_bucket_lookup(self._bucket_access)
            self.authz = AuthzService(self.storage)
            self.watch = WatchService(self.storage, bucket_exists=lambda b: self.objects.find_bucket(b) is not None)
            self.diagnostics = Diagnostics(self.storage, self.objects, recovery_participants())
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


@contextmanager
def open_offline(root: str | Path) -> Iterator[Anvil]:
    """Open a stopped store with every subsystem (for gc and repair, which act through them)."""
    p = check_storage_path(root)
    if not (p / FORMAT_FILE).is_file():
        raise AnvilError("UnsupportedFormat", f"{p / FORMAT_FILE} is missing: run fsck")
    anvil = Anvil(p)
    try:
        yield anvil
    finally:
        anvil.close()
