"""The composition root: one opened `STORAGE_PATH` with every subsystem on top of it."""

from __future__ import annotations

from pathlib import Path

from anvil.diagnostics import Diagnostics
from anvil.objects import ObjectService
from anvil.storage import Storage


class Anvil:
    def __init__(self, storage_path: str | Path, *, lock: bool = True):
        self.storage = Storage(storage_path, lock=lock)
        try:
            self.objects = ObjectService(self.storage)
            self.diagnostics = Diagnostics(self.storage, self.objects)
            self.storage.catalog.start()
        except BaseException:
            self.storage.close()
            raise

    def close(self) -> None:
        self.storage.close()
