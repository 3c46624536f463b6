"""The composition root: one opened `STORAGE_PATH` with every subsystem on top of it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anvil.artefacts import ArtefactService
from anvil.authz import AuthzService
from anvil.authz.rows import RowAuthz
from anvil.context import RequestContext, new_request_id
from anvil.diagnostics import Diagnostics
from anvil.diagnostics import findings as fnd
from anvil.diagnostics.service import check_storage_path
from anvil.errors import AnvilError
from anvil.identity import BucketAccess, IdentityService, gate, install_bucket_lookup
from anvil.identity.gate import install_object_access
from anvil.identity.settings import load_jwt_secret, load_keyring
from anvil.indexes import IndexService
from anvil.objects import ObjectService
from anvil.objects.lifecycle import LifecycleWorker
from anvil.participants import recovery_participants
from anvil.personaldb import PersonalDbService
from anvil.storage import Event, Storage, leases
from anvil.storage.layout import FORMAT_FILE
from anvil.storage.recovery import Participant
from anvil.watch import WatchService

if TYPE_CHECKING:
    from anvil.backup.repository import Repository


# Who records findings of failed read verifications (the journal's actor for them).
VERIFY_ACTOR = "system/read-verify"


def corruption_finding(report: dict[str, Any]) -> fnd.FindingRecord:
    """A failed read verification as a finding: `blob.corrupt`, naming the object version and the
    blob (`affected.sha256` is what repair and self-healing look findings up by)."""
    what = f"{report['bucket']}/{report['key']} version {report['version_id']}"
    affected = {k: report[k] for k in ("tenant", "bucket", "key", "version_id", "sha256")}
    affected["quarantined"] = report["quarantined"]
    detail = (f"reading {what}: blob {report['sha256']} {report['detail']}"
              + ("; the blob was moved to quarantine/" if report["quarantined"] else ""))
    return fnd.make_finding(
        "blobs", "error", "blob.corrupt", detail, affected, origin="read",
        identity={k: report[k] for k in ("bucket", "key", "version_id", "sha256")},
        operator_action_required=True,
    )


class Anvil:
    def __init__(self, storage_path: str | Path, *, lock: bool = True, endpoint: str | None = None,
                 records: str | None = None):
        # records: a postgresql:// URL (scale-out, storage.pg), else the embedded catalog.db.
        self.storage = Storage(storage_path, lock=lock, records=records)
        try:
            self.objects = ObjectService(self.storage)
            # S3 bucket lifecycle; its thread runs only inside `anvil serve` (start_background).
            self.lifecycle = LifecycleWorker(self.objects)
            secrets_dir = self.storage.layout.secrets
            self.identity = IdentityService(self.storage, load_keyring(secrets_dir), load_jwt_secret(secrets_dir))
            install_bucket_lookup(self._bucket_access)
            # Object access through bucket bindings is installed by the API for its Anvil
            # (api.access); a new Anvil starts without one, so no hook outlives its store.
            install_object_access(None)
            self.authz = AuthzService(self.storage, find_bucket=self.objects.find_bucket)
            self.watch = WatchService(self.storage, bucket_exists=lambda b: self.objects.find_bucket(b) is not None)
            self.artefacts = ArtefactService(self.storage, self.objects.find_bucket)
            self.diagnostics = Diagnostics(self.storage, self.objects, recovery_participants())
            self.personaldb = PersonalDbService(self.storage)
            # PersonalDB rows and projection filters by relationships (docs/personaldb.md): the two are
            # sibling layers, composed here. Authz answers; a schema change may not break a group's
            # binding; an authz write rebuilds the tenant's relation-filtered projections.
            self.personaldb.install_authz(RowAuthz(self.authz))
            self.authz.add_schema_guard(self.personaldb.binding_requirements)
            self.authz.on_write(self.personaldb.authz_changed)
            self.objects.on_corruption(self._record_corruption)
            self.indexes = IndexService(self.storage)
            # Bucket delete: artefacts refuse while the bucket holds any; index definitions go with it.
            self.objects.on_bucket_delete(self.artefacts.bucket_deleting)
            self.objects.on_bucket_delete(self.indexes.bucket_deleting)
            # Many nodes over one record store (docs/scale-out.md): background work only on the holder
            # of its lease, its writes fenced. The embedded store always holds every lease.
            self.leases = leases.Leases(self.storage.catalog, shared=records is not None)
            self.lifecycle.guard = self.leases.guard(leases.LIFECYCLE)
            self.watch.guard = self.leases.guard(leases.JOURNAL_COMPACTION)
            # gc runs on request (admin API, `anvil gc --endpoint`) on any node, one node at a time.
            self.diagnostics.gc_lease = lambda: self.leases.exclusive(leases.GC)
            self.storage.catalog.start()
            self.identity.bootstrap(endpoint)
        except BaseException:
            self.storage.close()
            raise

    # -- many nodes (docs/scale-out.md) ----------------------------------------------------------

    def start_cluster(self) -> None:
        """In a server: follow the journal that other nodes write to (watch wake-ups, caches) and
        compete for the background leases. Nothing happens on the embedded store."""
        if self.storage.records_url is None:
            return
        self.storage.catalog.follow(self.journal_changed)
        for name in (leases.LIFECYCLE, leases.JOURNAL_COMPACTION):
            self.leases.want(name)

    def journal_changed(self, events: list[Event]) -> None:
        """Drop what committed events (of any node) make stale in this process's caches: S3
        credentials and the application lifecycle (disabled, deleted, revoked, rotated), the newest
        authz revision per tenant, the bucket bindings, the bucket rows and settings. Watch streams and
        the index builder are woken by the follower itself (commit listeners)."""
        apps: set[str] = set()
        identity = bindings = False
        for ev in events:
            kind = ev.kind
            if kind.startswith("identity."):
                identity = True
                client_id = ev.payload.get("client_id")
                apps.add(client_id if isinstance(client_id, str) else "")
            elif kind.startswith("authz.binding.") or kind == "bucket.delete":
                bindings = True
            elif kind == "watch.compact" and isinstance(ev.payload.get("through_seq"), int):
                # Compacted by the lease holder: cursors before it expire here too, the cache lets go.
                base = int(ev.payload["through_seq"])
                if base > self.watch.base_seq:
                    self.watch.base_seq = base
                    self.watch.tail.drop_through(base)
            elif kind.startswith("authz."):
                # A write's revision is its event's seq (anvil.authz): minimize_latency reads at it.
                self.authz._note_write(ev.tenant, ev.seq)
        self.objects.journal_changed(events)  # bucket rows and settings another node changed
        if identity:
            for client_id in apps:
                self.identity._forget_sigv4(client_id or None)
            self.identity._reload_lifecycle()
        if bindings:
            self.authz._bindings = None

    def _bucket_access(self, name: str) -> BucketAccess | None:
        b = self.objects.find_bucket(name)
        return BucketAccess(b.tenant, b.public) if b is not None else None

    def _record_corruption(self, report: dict[str, Any]) -> None:
        # Deduplicated: every GET of the same broken version must not add another finding.
        fnd.record(self.storage.catalog, corruption_finding(report), actor=VERIFY_ACTOR,
                   request_id=new_request_id(), dedupe=True)

    def participants(self) -> list[Participant]:
        return recovery_participants()

    # `participants()` as another process builds it: a server's snapshot runs after its checkpoint
    # in a child process (backup.snapshot_process), which builds its own list with this.
    participants_factory = f"{recovery_participants.__module__}:{recovery_participants.__qualname__}"

    # One heal at a time per process: two runs would stream the same blobs twice.
    _heal_lock = threading.Lock()

    def heal_blobs(self, ctx: RequestContext, repo: Repository, *, snapshot: str | None = None,
                   progress: Any = None) -> dict[str, Any]:
        """`anvil repair blobs --from-backup`: restore every missing referenced blob from `repo`
        (backup.heal), then resolve every open finding about a healed blob and record the run as
        a finding (journaled, like every repair). Returns the heal report plus what was closed."""
        from anvil.backup.heal import heal_blobs
        from anvil.diagnostics import findings as fnd

        if not self._heal_lock.acquire(blocking=False):
            raise AnvilError("PreconditionFailed", "a heal from backup is already running")
        try:
            report = heal_blobs(self.storage, self.participants(), repo, snapshot=snapshot, progress=progress)
            by_sha = {h["sha256"]: h for h in report["healed"]}
            closed: list[str] = []
            conn = self.storage.catalog.reader()
            # Unresolved findings are few (fsck dedupes them); 10000 is list_findings' ceiling.
            for f in fnd.list_findings(conn, unresolved=True, limit=10000):
                # `affected.sha256` names the blob itself (missing, corrupt, quarantined); other
                # findings that merely mention a blob (e.g. a record's wrong size) stay open.
                sha = f.affected.get("sha256")
                healed = by_sha.get(sha) if isinstance(sha, str) else None
                if healed is None:
                    continue
                text = (f"healed from backup: blob {sha} restored from snapshot {healed['snapshot']} of "
                        f"{report['repository']} and re-verified (SHA-256 and size)")
                try:
                    fnd.resolve(self.storage.catalog, f.id, text, actor=ctx.actor, request_id=ctx.request_id)
                    closed.append(f.id)
                except AnvilError as e:
                    if e.code != "PreconditionFailed":  # resolved concurrently: fine
                        raise
            report["findings_resolved"] = closed
            refs = [r for item in [*report["healed"], *report["unrecoverable"]] for r in item["references"]]
            summary = (f"healed {report['healed_count']} of {report['missing']} missing blob(s) from "
                       f"{report['repository']}" + (f" snapshot {report['snapshot']}" if report["snapshot"] else "")
                       + (f"; {len(report['unrecoverable'])} unrecoverable" if report["unrecoverable"] else ""))
            run = fnd.make_finding(
                "diagnostics", "info", "repair.healed_from_backup", summary,
                {"family": "blobs", "repository": report["repository"], "snapshot": report["snapshot"],
                 "snapshots_used": report["snapshots_used"], "healed": sorted(by_sha),
                 "unrecoverable": [u["sha256"] for u in report["unrecoverable"]],
                 "findings_resolved": closed, "references": refs[:50]},
                identity={"run_id": ctx.request_id}, origin="repair", run_id=ctx.request_id,
                cursor=str(self.storage.catalog.head()[0]), repair_attempted=True, repair_result=summary,
                # The run itself needs nothing more; blobs left missing keep their own open findings.
                resolved_at=0.0, resolution="recorded by repair blobs --from-backup")
            report["finding"] = fnd.record_many(self.storage.catalog, [run], actor=ctx.actor,
                                                request_id=ctx.request_id)[0].to_dict()
            return report
        finally:
            self._heal_lock.release()

    def close(self) -> None:
        if getattr(gate._object_access, "anvil", None) is self:
            install_object_access(None)
        self.lifecycle.stop()
        self.indexes.close()
        self.watch.close()
        if hasattr(self, "leases"):
            self.leases.close()  # given back: another node takes the work over at its next renewal
        if hasattr(self, "personaldb"):
            self.personaldb.close()
        self.artefacts.close()  # the git stores' open pack files
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
