"""The recovery contract: the participant protocol, its context and the one `Finding` type of the project.

It is the top of `anvil.storage` (it uses only the record-store interface, the blob store and
its scan), so every subsystem implements it without importing the backup engine, and the
backup engine, restore, the drill, fsck and gc use it without knowing any subsystem.

Every subsystem ships one participant in `<package>/participant.py` with the six designed
operations: `describe`, `checkpoint`, `summary`, `validate`, `rebuild`, `smoke`. What some
subsystems need beyond those is an optional *capability* (a small protocol below); backup,
restore, the drill, fsck and gc discover capabilities with `isinstance` and never name a
subsystem. The composition root (`anvil.runtime`) builds the participant list and hands it
to all of them.

A participant works on a `RecoveryContext`: one record-store connection (the checkpoint copy
while backing up, the restored catalog while validating, a reader of the live store for
fsck) plus the blob store, never the live server's objects, so the same code serves an online
backup, an offline one, a restore and fsck.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from anvil.storage import catalogcheck, inline, records
from anvil.storage.blobs import BlobStore
from anvil.storage.blobscan import ScanResult
from anvil.storage.records import Connection

# The coverage checklist of the design, in its order: (item id, what it is).
CHECKLIST: list[tuple[str, str]] = [
    ("object-bodies", "object bodies and multipart state"),
    ("object-journal", "object metadata journal and compaction outputs"),
    ("bucket-metadata", "bucket and placement metadata"),
    ("path-indexes", "path and directory indexes"),
    ("metadata-indexes", "metadata index definitions and generations"),
    ("fulltext", "full-text segments and tokenizer metadata"),
    ("vector", "vector segments and HNSW graph"),
    ("authz", "authorisation schemas, tuples, caveats and derived indexes"),
    ("watch", "watch logs, cursors and checkpoints"),
    ("personaldb", "PersonalDB commits, snapshots, projections and certificates"),
    ("artefacts", "source and model artefact manifests"),
    ("secrets", "control-plane secrets (key ids always, key material only when escrowed)"),
    ("diagnostics", "diagnostic and repair findings"),
]
CHECKLIST_IDS = [c[0] for c in CHECKLIST]
NOT_PRESENT = "not present in this deployment"

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One observation by a participant; any `error` fails a validation, an fsck, a verify or a drill.

    `invariant` names the rule that broke (stable across runs, e.g. `objects.blob_missing`);
    `affected` says what it touches (tenants named in it decide who may see the finding);
    `identity` (default: `affected`) names the broken thing without volatile details, so a
    re-run recognises a finding it already recorded.
    """

    participant: str
    severity: Severity
    subject: str
    message: str
    invariant: str = ""
    affected: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] | None = None
    cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Description:
    name: str
    kind: Literal["source", "derived"]
    covers: list[str]
    owns: list[str] = field(default_factory=list)
    # Catalog tables holding this participant's records (the conformance suite corrupts them).
    tables: list[str] = field(default_factory=list)
    # False when a restore of some buckets leaves this participant's summary comparable to the
    # recorded one (e.g. the journal chain); True when dropping buckets changes it by design.
    summary_depends_on_buckets: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlobRef(NamedTuple):
    """One record's use of one blob: what gc keeps, backup copies and fsck/restore check."""

    sha256: str
    size: int
    label: str  # human-readable referrer ("bucket/key@version")
    ref: dict[str, Any]  # the referrer as structured data (names its tenant)
    missing_invariant: str  # the invariant broken when this blob is absent


class Progress:
    """What a long validation reports while it runs (fsck renders it as progress bars).

    `phase` announces a step and returns the function that advances *that* step: the blob
    scan advances from worker threads while the main thread moves through other phases."""

    def phase(self, name: str, total: int | None = None) -> Callable[[int], None]:
        return _ignore


def _ignore(n: int) -> None:
    pass


class RebuildRefused(Exception):
    """A source participant was asked to rebuild: source records can only be restored."""


class RecoveryContext:
    """What a participant may look at: one connection, the blob store, the storage root, and
    the results every participant shares (blob references, the blob-store scan)."""

    def __init__(self, root: Path, conn: Connection, blobs: BlobStore,
                 participants: Iterable[Participant] = (), *, escrow_secrets: bool | None = False,
                 credentials: tuple[str, str] | None = None, deep: bool = True,
                 progress: Progress | None = None, hash_threads: int = 2):
        self.root = Path(root)
        self.conn = conn
        self.blobs = blobs
        self.participants = list(participants)
        # Backup policy: key material goes into a snapshot when the operator asked for it, or (None:
        # no explicit choice) when a `DefaultEscrow` participant says its keys exist nowhere else.
        self.escrow_secrets = escrow_secrets
        # The drill's (client_id, client_secret), for smoke tests that prove token exchange.
        self.credentials = credentials
        # Deep: re-hash every blob (restore validation, `fsck --deep`); otherwise sizes and names only.
        self.deep = deep
        self.progress = progress or Progress()
        self.hash_threads = hash_threads
        # Invariants evaluated and figures gathered by validate(): fsck resolves earlier findings
        # of invariants it checked again, and reports the figures.
        self.checked: set[str] = set()
        self.stats: dict[str, dict[str, Any]] = {}
        self._refs: dict[str, list[BlobRef]] | None = None
        self._referenced: Callable[[], Iterator[tuple[str, int]]] | None = None
        self._scan: ScanResult | None = None
        self._scan_thread: threading.Thread | None = None
        self._scan_error: BaseException | None = None
        self._inline: tuple[int, list[inline.Mismatch]] | None = None
        self._catalog_problems: list[str] | None = None
        self._catalog_thread: threading.Thread | None = None
        self._bodies_with_catalog = False  # deep: the catalog check hashes the inline bodies

    def references(self) -> dict[str, list[BlobRef]]:
        """Every blob any participant references -> its references (sorted by hash), from one read
        transaction. The one blob-reference query that gc, fsck, backup and restore share."""
        if self._refs is None:
            refs: dict[str, list[BlobRef]] = {}
            with self.conn:
                for r in self.iter_blob_references():
                    refs.setdefault(r.sha256, []).append(r)
            self._refs = dict(sorted(refs.items()))
        return self._refs

    def iter_blob_references(self) -> Iterator[BlobRef]:
        """Every participant's blob references as they are read (unsorted, not held): for a caller
        that keeps them elsewhere (a backup sorts them on disk). Run it inside one read transaction."""
        for p in self.participants:
            if isinstance(p, BlobReferrer):
                yield from p.blob_references(self)

    def iter_blob_reference_rows(self) -> Iterator[tuple[str, int, str]]:
        """`iter_blob_references` as (sha256, size, label), in the same order."""
        for source in self.blob_reference_sources():
            yield from self.source_rows(source)

    def source_rows(self, source: list[str] | Iterator[tuple[str, int, str]]) -> Iterator[tuple[str, int, str]]:
        """The rows of one of `blob_reference_sources`: its SELECTs run in turn, or its rows."""
        if isinstance(source, list):
            for query in source:
                yield from self.conn.execute(query)
        else:
            yield from source

    def blob_reference_sources(self) -> Iterator[list[str] | Iterator[tuple[str, int, str]]]:
        """`iter_blob_reference_rows` per participant, in order: the SELECTs that give its rows when
        it has `blob_reference_queries` (a caller may copy them with the record store itself, no
        Python per row), else its rows, built from its `BlobRef`s."""
        for p in self.participants:
            if isinstance(p, BlobReferrer):
                queries = getattr(p, "blob_reference_queries", None)
                yield queries() if queries is not None else (
                    (r.sha256, r.size, r.label) for r in p.blob_references(self))

    def referenced_blobs(self) -> Iterator[tuple[str, int]]:
        """(sha256, size its first reference records) of every referenced blob, sorted by hash.
        From the stream a caller installed (`stream_referenced_blobs`: a backup reads them back
        from its on-disk sorted store, never holding them all), else from `references()`."""
        if self._referenced is not None:
            yield from self._referenced()
            return
        for sha, rs in self.references().items():
            yield sha, rs[0].size

    def stream_referenced_blobs(self, source: Callable[[], Iterator[tuple[str, int]]]) -> None:
        """Install what `referenced_blobs` reads (each call of `source` starts a new pass)."""
        self._referenced = source

    def clear_references(self) -> None:
        """Forget the references read so far (the next `references()` reads them afresh)."""
        self._refs = None

    def start_blob_scan(self) -> None:
        """Walk (and, deep, hash) the blob store on worker threads while the caller goes on.

        Callers that compare the walk with references start it *before* reading references, so a
        blob written after the walk can never look like an orphan."""
        if self._scan is not None or self._scan_thread is not None:
            return
        advance = self.progress.phase("hashing blobs" if self.deep else "listing blobs")

        # Deep, on SQLite, unless the catalog check hashes them (`start_catalog_check`): the inline
        # bodies are hashed by the same worker, after the files, on connections of their own, so that
        # work too overlaps the caller's record checks.
        inline_file = records.sqlite_file(self.conn) if self.deep and not self._bodies_with_catalog else None

        def run() -> None:
            try:
                self._scan = self.blobs.scan(deep=self.deep, threads=self.hash_threads, on_progress=advance)
                if inline_file is not None:
                    self._inline = catalogcheck.check_bodies(inline_file, self.hash_threads)
            except BaseException as e:  # noqa: BLE001 - re-raised by blob_scan() in the caller's thread
                self._scan_error = e

        self._scan_thread = threading.Thread(target=run, name="anvil-blob-scan", daemon=True)
        self._scan_thread.start()

    def blob_scan(self) -> ScanResult:
        self.start_blob_scan()
        if self._scan_thread is not None:
            self._scan_thread.join()
            self._scan_thread = None
        if self._scan_error is not None:
            raise self._scan_error
        assert self._scan is not None
        return self._scan

    def inline_check(self) -> tuple[int, list[inline.Mismatch]]:
        """Deep: (inline bodies hashed, those whose hash or size differs from their row), from the
        catalog check or the background scan when one did them (SQLite), else computed here."""
        self.blob_scan()
        if self._bodies_with_catalog:
            self._join_catalog_check()
        if self._inline is None:
            self._inline = inline.check_bodies(self.conn, self.hash_threads)
        return self._inline

    def start_catalog_check(self) -> None:
        """Run catalog.db's own checks on a thread while the caller goes on: SQLite's
        `integrity_check` (which reads every page of the file) and, deep and unless the blob scan
        was started first, the hashing of every inline body (`catalogcheck.check_catalog`: on
        connections of their own, and for a large catalog in a child process, which shares no GIL
        with the Python of the caller's record checks)."""
        if self._catalog_thread is not None or self._catalog_problems is not None:
            return
        path = records.sqlite_file(self.conn)
        if path is None:
            return  # another engine: catalog_problems() asks it on the caller's connection
        self._bodies_with_catalog = self.deep and self._scan is None and self._scan_thread is None
        hash_threads = self.hash_threads if self._bodies_with_catalog else 0

        def run() -> None:
            # Should this raise, the thread ends with nothing set, and the caller's catalog_problems()
            # and inline_check() do the work on its own connection.
            self._catalog_problems, bodies = catalogcheck.check_catalog(path, hash_threads)
            if bodies is not None:
                self._inline = bodies

        self._catalog_thread = threading.Thread(target=run, name="anvil-catalog-check", daemon=True)
        self._catalog_thread.start()

    def _join_catalog_check(self) -> None:
        if self._catalog_thread is not None:
            self._catalog_thread.join()
            self._catalog_thread = None

    def catalog_problems(self) -> list[str]:
        """The structural check's messages ([] when sound): the background one if started."""
        self._join_catalog_check()
        if self._catalog_problems is None:
            self._catalog_problems = records.integrity_problems(self.conn)
        return self._catalog_problems


class Participant:
    """The six designed operations, with the defaults a source participant without files needs."""

    name = "participant"
    kind: Literal["source", "derived"] = "source"
    covers: list[str] = []
    owns: list[str] = []
    tables: list[str] = []
    summary_depends_on_buckets = True
    # When a backup may take this participant's summary over from the parent snapshot instead of
    # computing it again (a summary of a large store reads every row): "" never; "events": when
    # the journal holds no event of its `replays` kinds since the parent (its summary is a function
    # of the records those events write, and of nothing else); "head": only when the journal head
    # (seq and hash) is the parent's (nothing at all happened).
    summary_reuse = ""

    def describe(self) -> Description:
        return Description(self.name, self.kind, list(self.covers), list(self.owns), list(self.tables),
                           self.summary_depends_on_buckets)

    def checkpoint(self, ctx: RecoveryContext) -> None:
        """Make this participant's own files consistent for a copy (the catalog is copied by the engine)."""

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        """Counts and digests recorded in the manifest and compared after restore."""
        return {}

    def summary_after(self, ctx: RecoveryContext, recorded: dict[str, Any]) -> dict[str, Any] | None:
        """`summary`, extended from the one a parent snapshot recorded (`recorded`) by reading only
        what came after it; None when that cannot be done soundly (then `summary` runs). Without a
        damaged store, the result must equal `summary(ctx)`: a restore compares against it."""
        return None

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        """Findings about this participant's state (`recorded`: its summary at backup time, if any)."""
        return []

    def rebuild(self, ctx: RecoveryContext) -> list[Finding]:
        """Derived participants recompute their state from source records; source ones refuse."""
        if self.kind == "source":
            raise RebuildRefused(f"{self.name} holds source records: it cannot be rebuilt, only restored")
        return []

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        """An end-to-end proof through the public API of a running (restored) server."""
        return []

    def finding(self, severity: Severity, subject: str, message: str, invariant: str = "",
                affected: dict[str, Any] | None = None, *, identity: dict[str, Any] | None = None,
                cursor: str | None = None) -> Finding:
        return Finding(self.name, severity, subject, message, invariant, affected or {}, identity, cursor)


# -- optional capabilities ---------------------------------------------------------------------


@runtime_checkable
class BlobReferrer(Protocol):
    """Records of this participant reference blobs (bodies, parts, snapshots ...)."""

    def blob_references(self, ctx: RecoveryContext) -> Iterable[BlobRef]: ...


@runtime_checkable
class FileOwner(Protocol):
    """Owns files under the storage root besides catalog.db and blobs (derived generations, secrets)."""

    def files(self, ctx: RecoveryContext) -> list[Path]: ...


@runtime_checkable
class RestoreFixup(Protocol):
    """Restored files need fixing up (permissions, ...) before anything opens them."""

    def after_restore(self, root: Path) -> None: ...


@runtime_checkable
class KeyHolder(Protocol):
    """Records depend on secret keys; their ids are always recorded in the manifest."""

    def key_ids(self, ctx: RecoveryContext) -> list[str]: ...


@runtime_checkable
class DefaultEscrow(Protocol):
    """Key material that exists only under the storage root (development mode's generated keys):
    without an explicit choice, a snapshot escrows it, since no restore could open anything otherwise."""

    def default_escrow(self, ctx: RecoveryContext) -> str | None:
        """Why this participant's key material is escrowed by default (None: it is not)."""
        ...


@runtime_checkable
class BucketScoped(Protocol):
    """Holds per-bucket records: a partial restore drops those outside the chosen buckets."""

    def restrict_to_buckets(self, conn: Connection, buckets: set[str]) -> dict[str, Any]:
        """Drop records outside `buckets` (inside the caller's transaction); return kept/dropped names."""
        ...


@runtime_checkable
class ResumedSmoke(Protocol):
    """Has a proof that needs writes: the drill runs it after the restored server resumed traffic."""

    def smoke_resumed(self, client: Any, ctx: RecoveryContext,
                      recorded: dict[str, Any] | None = None) -> list[Finding]: ...


@runtime_checkable
class ObjectLocator(Protocol):
    """Can find one object version in a catalog (for `anvil backup get` out of a snapshot)."""

    def locate_object(self, conn: Connection, bucket: str, key: str,
                      version_id: str | None = None) -> dict[str, Any] | None:
        """{version_id, delete_marker, size, sha256, chunks: [(sha, size)], etag, content_type} or None."""
        ...


@runtime_checkable
class Replayer(Protocol):
    """Rebuilds its source rows from journal events (point-in-time restore, the replay property).

    `replays` names the event kinds it owns by prefix (`"object."`, `"identity."` ...): every
    kind a store can journal must have an owner, or replay refuses the event. `migrations` is
    its schema, so an empty store can be made to replay a whole journal into. `apply` writes
    the rows one event stands for, on `ctx.conn` (the writer, inside the replay transaction),
    using only the event: its payload, `ts` (the mutation's clock), `actor` and `seq`.
    """

    replays: tuple[str, ...]

    def migrations(self) -> dict[str, list[str]]: ...

    def apply(self, ctx: RecoveryContext, event: Any) -> None: ...


@runtime_checkable
class EventBlobs(Protocol):
    """Events of this participant reference blobs (a body, a part): continuous archiving ships
    them with the event, and gc keeps them until the archive holds them."""

    def event_blobs(self, event: Any) -> Iterable[tuple[str, int]]:
        """(sha256, size) of every blob `event` references."""
        ...


def blobs_of_events(participants: Iterable[Participant], events: Iterable[Any]) -> dict[str, int]:
    """sha256 -> size of every blob the events reference, in first-use order."""
    referrers = [p for p in participants if isinstance(p, EventBlobs)]
    out: dict[str, int] = {}
    for ev in events:
        for p in referrers:
            for sha, size in p.event_blobs(ev):
                out.setdefault(sha, int(size))
    return out


class UnreplayableEvent(Exception):
    """No participant owns this event kind: replay cannot rebuild its rows."""


def replay_owner(participants: Iterable[Participant], kind: str) -> Participant | None:
    """The participant whose longest `replays` prefix matches `kind`."""
    best: tuple[int, Participant] | None = None
    for p in participants:
        if isinstance(p, Replayer):
            for prefix in p.replays:
                if kind.startswith(prefix) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), p)
    return best[1] if best else None


def replay_applier(ctx: RecoveryContext) -> Callable[[Any, Any], None]:
    """`Catalog.replay`'s `apply`: hands each event to its owner with a context on the writer."""
    owners: dict[str, Participant] = {}

    def apply(conn: Connection, event: Any) -> None:
        owner = owners.get(event.kind)
        if owner is None:
            owner = replay_owner(ctx.participants, event.kind)
            if owner is None:
                raise UnreplayableEvent(f"no participant replays event kind {event.kind!r} (seq {event.seq})")
            owners[event.kind] = owner
        ctx.conn = conn
        owner.apply(ctx, event)  # type: ignore[attr-defined]

    return apply


def replay_into(catalog_path: Path, events: Iterable[Any], participants: Iterable[Participant], *,
                root: Path | None = None, blobs: BlobStore | None = None, batch: int = 1000,
                on_batch: Callable[[int], None] | None = None) -> int:
    """Replay `events` onto the catalog at `catalog_path` (a restored snapshot's, or a new empty one:
    every replayer's schema is applied first). Returns how many events were applied."""
    from anvil.storage.catalog import Catalog

    parts = list(participants)
    catalog = Catalog(catalog_path)
    try:
        for p in parts:
            if isinstance(p, Replayer):
                for component, migrations in p.migrations().items():
                    catalog.migrate(component, migrations)
        ctx = RecoveryContext(root or Path(catalog_path).parent, None, blobs, parts)  # type: ignore[arg-type]
        return catalog.replay(events, replay_applier(ctx), batch=batch, on_batch=on_batch)
    finally:
        catalog.close()


def coverage(descriptions: Iterable[Description]) -> list[dict[str, Any]]:
    """The checklist: each item -> the participants covering it (empty = not present)."""
    descs = list(descriptions)
    return [
        {"item": item, "label": label, "participants": [d.name for d in descs if item in d.covers]}
        for item, label in CHECKLIST
    ]


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)
