"""The composition root: one opened `STORAGE_PATH` with every subsystem on top of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from anvil.objects import ObjectService
from anvil.storage import Storage

if TYPE_CHECKING:
    from anvil.backup.participant import Participant


def recovery_participants() -> list[Participant]:
    """Every subsystem's recovery participant; later subsystems append theirs here."""
    from anvil.backup.storage_participants import BlobsParticipant, JournalParticipant
    from anvil.objects.recovery import ObjectsParticipant

    return [JournalParticipant(), ObjectsParticipant(), BlobsParticipant()]


class Anvil:
    def __init__(self, storage_path: str | Path, *, lock: bool = True):
        self.storage = Storage(storage_path, lock=lock)
        try:
            self.objects = ObjectService(self.storage)
            self.storage.catalog.start()
        except BaseException:
            self.storage.close()
            raise

    def participants(self) -> list[Participant]:
        return recovery_participants()

    def close(self) -> None:
        self.storage.close()
