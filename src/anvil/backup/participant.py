"""Recovery participants: how each subsystem takes part in backup, restore, validation and drills.

The backup engine, restore, `anvil recovery validate` and `anvil drill` only iterate
participants; none of them knows a subsystem's tables. Each subsystem ships one participant
(`describe`, `checkpoint`, `summary`, `validate`, `rebuild`, `smoke`) and the composition root
(`anvil.runtime.recovery_participants`) lists them.

A participant works on a `RecoveryContext`: a catalog connection (the checkpoint copy while
backing up, the restored catalog while validating) plus the blob store, never the live
server's objects, so the same code serves an online backup, an offline one and a restore.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import apsw

from anvil.storage import BlobStore

# The coverage checklist of DESIGN §5, in its order: (item id, what it is).
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
    """One observation; any `error` fails a validation, a verify or a drill."""

    participant: str
    severity: Severity
    subject: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Description:
    name: str
    kind: Literal["source", "derived"]
    covers: list[str]
    owns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RecoveryContext:
    """What a participant may look at: one catalog connection, the blob store, the storage root."""

    def __init__(self, root: Path, conn: apsw.Connection, blobs: BlobStore,
                 participants: Iterable[Participant] = (), *, escrow_secrets: bool = False,
                 credentials: tuple[str, str] | None = None):
        self.root = Path(root)
        self.conn = conn
        self.blobs = blobs
        self.participants = list(participants)
        # Backup policy: key material goes into a snapshot only when the operator asked for it.
        self.escrow_secrets = escrow_secrets
        # The drill's (client_id, client_secret), for smoke tests that prove token exchange.
        self.credentials = credentials
        self._refs: dict[str, list[str]] | None = None

    def references(self) -> dict[str, list[str]]:
        """Every blob any participant references -> labels of what references it (sorted by hash)."""
        if self._refs is None:
            refs: dict[str, list[str]] = {}
            for p in self.participants:
                for sha, label in p.blob_references(self):
                    refs.setdefault(sha, []).append(label)
            self._refs = dict(sorted(refs.items()))
        return self._refs


class Participant:
    """Base class with the defaults a source participant without files or blobs needs."""

    name = "participant"
    kind: Literal["source", "derived"] = "source"
    covers: list[str] = []
    owns: list[str] = []

    def describe(self) -> Description:
        return Description(self.name, self.kind, list(self.covers), list(self.owns))

    def checkpoint(self, ctx: RecoveryContext) -> None:
        """Make this participant's own files consistent for a copy (the catalog is copied by the engine)."""

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        """Counts and digests recorded in the manifest and compared after restore."""
        return {}

    def files(self, ctx: RecoveryContext) -> list[Path]:
        """Files under the storage root this participant needs backed up besides catalog.db and blobs
        (e.g. a derived family's latest published generation, consistent after `checkpoint`)."""
        return []

    def blob_references(self, ctx: RecoveryContext) -> Iterator[tuple[str, str]]:
        """(sha256, label) for each blob this participant's records reference."""
        return iter(())

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        return []

    def rebuild(self, ctx: RecoveryContext) -> list[Finding]:
        if self.kind == "source":
            raise TypeError(f"{self.name} holds source records: it cannot be rebuilt, only restored")
        return []

    def restrict_to_buckets(self, conn: apsw.Connection, buckets: set[str]) -> dict[str, Any]:
        """Partial restore: drop records outside these buckets; return what was dropped."""
        return {}

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        """An end-to-end proof through the public API of a running (restored) server."""
        return []

    def smoke_resumed(self, client: Any, ctx: RecoveryContext,
                      recorded: dict[str, Any] | None = None) -> list[Finding]:
        """A proof that needs writes, run by the drill after the restored server resumed normal traffic."""
        return []

    def key_ids(self, ctx: RecoveryContext) -> list[str]:
        """Ids of secret keys this participant's records depend on (always recorded in the manifest)."""
        return []

    def after_restore(self, root: Path) -> None:
        """Fix up this participant's restored files (permissions, ...) before anything opens them."""

    def finding(self, severity: Severity, subject: str, message: str) -> Finding:
        return Finding(self.name, severity, subject, message)


def coverage(descriptions: Iterable[Description]) -> list[dict[str, Any]]:
    """The checklist: each item -> the participants covering it (empty = not present)."""
    descs = list(descriptions)
    return [
        {"item": item, "label": label, "participants": [d.name for d in descs if item in d.covers]}
        for item, label in CHECKLIST
    ]


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)
