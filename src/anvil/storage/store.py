"""`Storage`: one opened STORAGE_PATH (layout and lock, catalog, blob store, free space)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from anvil.storage import idempotency, inline, journal
from anvil.storage.blobbackend import BlobBackend, backend_from_env
from anvil.storage.blobs import BlobStore, drop_behind_from_env
from anvil.storage.catalog import Catalog
from anvil.storage.journal import Event
from anvil.storage.layout import FormatInfo, Layout, fsync_dir
from anvil.storage.space import DiskSpace

# A blob gc moved aside while deciding whether to remove it (`Storage.quarantine_path`).
_QUARANTINED = re.compile(r"gc-([0-9a-f]{64})-[0-9a-f]+")


class Storage:
    """One opened `STORAGE_PATH`: the layout, its lock, the catalog and the blob store.

    `records`: a `postgresql://` URL puts the catalog in PostgreSQL (storage.pg) instead of
    `catalog.db`; None is the embedded default. `blobs`: where bodies live (storage.blobbackend);
    None reads `ANVIL_BLOBS_URL` (what `anvil serve --blobs` sets), else files under `root`."""

    def __init__(self, root: str | Path, *, lock: bool = True, records: str | None = None,
                 blobs: BlobBackend | None = None):
        self.layout = Layout(root)
        if lock:
            self.layout.acquire_lock()
        try:
            backend = blobs if blobs is not None else backend_from_env()  # a malformed URL stops the start
            self.format: FormatInfo = self.layout.initialise()
            # Free-space admission and the reserve; a "disk full" commit releases it and retries.
            self.space = DiskSpace.from_env(self.layout.root, manage_reserve=lock)
            self.space.make_room_to_open()
            # The records of a scaled-out node live in PostgreSQL (`records` is its URL); the blobs,
            # secrets and bootstrap files stay under `root`.
            self.records_url = records
            if records:
                from anvil.storage.pg import PgCatalog

                self.catalog = PgCatalog(records)
            else:
                self.catalog = Catalog(self.layout.catalog_path)
            self.catalog.on_full = self.space.release
            self.catalog.migrate("idempotency", idempotency.MIGRATIONS)
            self.catalog.migrate("blobs", inline.MIGRATIONS)
            self.format = self._deployment(self.format, write=lock)
            inline_max = inline.max_from_env()  # a malformed ANVIL_INLINE_MAX stops the start
            drop_behind = drop_behind_from_env()  # and so does a malformed ANVIL_DROP_BEHIND
        except BaseException:
            # A refused start (e.g. an un-migrated PostgreSQL store) closes what it opened: a pool left
            # to the garbage collector prints a traceback at exit ("cannot join current thread").
            catalog = getattr(self, "catalog", None)
            if catalog is not None:
                with contextlib.suppress(Exception):
                    catalog.close()
            self.layout.release_lock()
            raise
        self.blobs = BlobStore(self.layout.blobs, self.layout.tmp,
                               backend=backend)
        # Small bodies go inline in catalog.db (storage.inline); reads look in both places.
        self.blobs.attach_catalog(self.catalog, inline_max)
        self.blobs.drop_behind = drop_behind
        self._locked = lock
        if lock:
            self.blobs.prepare_fanout()

    def _deployment(self, info: FormatInfo, *, write: bool) -> FormatInfo:
        """The deployment id is the record store's (one for every node of a scaled deployment, so their
        backups chain and their archive is one); this path's FORMAT gives it to a store that has none
        yet (a store made before it was kept there, or the first node). A FORMAT that says otherwise
        is a copy made by a node's first start: it is rewritten to match (when this process holds the
        path's lock), so offline tools and a backup's FORMAT file agree."""
        stored = journal.claim_deployment_id(self.catalog._writer, info.deployment_id, time.time())
        if stored == info.deployment_id:
            return info
        adopted = FormatInfo(info.version, stored)
        if write:
            self.layout.write_format(adopted)
        return adopted

    def clear_tmp(self) -> None:
        """Drop bodies a previous process was receiving when it died: none was acknowledged.

        Called by the server at start, while it holds the lock (no other process can be writing
        there); offline tools leave tmp/ alone and gc removes what is old.

        Folders go too: an online backup's checkpoint (`checkpoint-*/`, a whole copy of catalog.db)
        and PersonalDB's work folders (`anvil-pdb-*/`) live there while they run, and a process
        killed meanwhile left them behind for ever (gc only removes `upload-*` files).
        """
        if not self._locked:
            raise RuntimeError("tmp/ may only be cleared while holding the storage lock")
        for entry in os.scandir(self.layout.tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.is_file(follow_symlinks=False):
                self._unquarantine(entry)
                os.unlink(entry.path)

    def quarantine_path(self, sha256: str) -> Path:
        """Where gc moves a blob file aside while it decides (in tmp/, named so `clear_tmp` knows it)."""
        return self.layout.tmp / f"gc-{sha256}-{uuid.uuid4().hex[:8]}"

    def _unquarantine(self, entry: os.DirEntry) -> None:
        """A blob gc had moved aside (`gc-<sha256>-<id>`) goes back under its name if that is free.

        gc renames an orphan into tmp/ and, if a PUT of the same content refreshed it meanwhile,
        links it back: a process killed between the two would otherwise lose a body that PUT was
        acknowledged for. The file was a whole, durable blob, so naming it again is safe; at worst it
        is an orphan the next gc removes."""
        m = _QUARANTINED.fullmatch(entry.name)
        if m is None:
            return
        dest = self.layout.blobs / m[1][:2] / m[1]
        if dest.exists():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.link(entry.path, dest)
            fsync_dir(dest.parent)

    def read_journal(self, after: int = 0, limit: int = 1000) -> list[Event]:
        return journal.read(self.catalog.reader(), after, limit)

    def verify_journal(self) -> tuple[int, list[journal.ChainProblem]]:
        """(events checked, problems) over the whole chain, on this thread's reader."""
        return journal.verify_chain(self.catalog.reader())

    @property
    def root(self) -> Path:
        return self.layout.root

    def close(self) -> None:
        self.catalog.close()
        self.layout.release_lock()

