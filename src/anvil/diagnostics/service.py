"""The diagnostics subsystem as the runtime and the admin API see it, plus offline opening."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anvil.context import Principal, RequestContext
from anvil.diagnostics import findings as fnd
from anvil.diagnostics.fsck import FsckReport, Target, run_fsck
from anvil.diagnostics.gc import DEFAULT_GRACE, DEFAULT_UPLOAD_EXPIRY, GcReport, run_gc
from anvil.diagnostics.repair import run_repair
from anvil.errors import AnvilError
from anvil.storage import Catalog, Layout, Storage, records
from anvil.storage.recovery import Participant, Progress

if TYPE_CHECKING:  # only annotated: fsck, gc and repair offline need none of the object service
    from anvil.objects import ObjectService

# Offline tools act as this principal: whoever can open the stopped STORAGE_PATH is its operator.
OFFLINE_PRINCIPAL = Principal(tenant="system", subject="offline-cli", admin=True, scopes=("*",))


class Diagnostics:
    def __init__(self, storage: Storage, objects: ObjectService, participants: list[Participant]):
        self.storage = storage
        self.objects = objects
        self.participants = participants
        storage.catalog.migrate("diagnostics", fnd.MIGRATIONS)
        # One fsck/gc/repair at a time: two gc runs racing over the same orphans gain nothing.
        self._run_lock = threading.Lock()
        # Many nodes (docs/scale-out.md): the runtime gives gc its lease (`Leases.exclusive(GC)`), so
        # one node of a deployment collects at a time and its deletes are fenced.
        self.gc_lease: Callable[[], AbstractContextManager[Any]] = nullcontext

    def target(self) -> Target:
        return Target(self.storage.layout, self.storage.catalog)

    def fsck(self, ctx: RequestContext, *, deep: bool = False, progress: Progress | None = None,
             mode: str = "online") -> FsckReport:
        with self._run_lock:
            return run_fsck(self.target(), self.participants, deep=deep, mode=mode, progress=progress, actor=ctx.actor,
                            request_id=ctx.request_id)

    def gc(self, ctx: RequestContext, *, grace: float = DEFAULT_GRACE,
           upload_expiry: float = DEFAULT_UPLOAD_EXPIRY, dry_run: bool = False) -> GcReport:
        with self._run_lock, self.gc_lease():
            return run_gc(self.storage, self.objects, self.participants, ctx, grace=grace, upload_expiry=upload_expiry,
                          dry_run=dry_run, fence=self.storage.catalog.confirm_fence)

    def repair(self, ctx: RequestContext, families: list[str] | None = None) -> dict[str, Any]:
        with self._run_lock:
            return run_repair(self.storage, self.participants, ctx, families)

    def list_findings(self, **filters: Any) -> list[fnd.FindingRecord]:
        return fnd.list_findings(self.storage.catalog.reader(), **filters)

    def resolve(self, ctx: RequestContext, finding_id: str, resolution: str) -> fnd.FindingRecord:
        return fnd.resolve(self.storage.catalog, finding_id, resolution, actor=ctx.actor,
                           request_id=ctx.request_id)


def check_storage_path(root: str | Path) -> Path:
    """Refuse (without creating anything) a path that is not an existing Anvil store."""
    p = Path(root).absolute()
    if not p.is_dir():
        raise AnvilError("NotFound", f"storage path {p} does not exist")
    if not (p / "catalog.db").is_file():
        raise AnvilError("InvalidArgument", f"{p} is not an Anvil storage path (no catalog.db)")
    return p


@contextmanager
def open_offline_target(root: str | Path) -> Iterator[Target]:
    """Open a stopped store for fsck: take its lock (a running server holds it: refused with
    StorageLocked) and open catalog.db directly, without Storage's first-use initialisation,
    so a missing or broken FORMAT is reported, never rewritten."""
    p = check_storage_path(root)
    layout = Layout(p)
    layout.acquire_lock()
    catalog: Catalog | None = None
    try:
        error = None
        try:
            catalog = Catalog(layout.catalog_path)
            catalog.migrate("diagnostics", fnd.MIGRATIONS)
        except records.RecordError as e:
            error = str(e)
            catalog = None
        yield Target(layout, catalog, error)
    finally:
        if catalog is not None:
            catalog.close()
        layout.release_lock()
