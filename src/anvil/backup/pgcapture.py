"""Backup and restore of a deployment whose records live in PostgreSQL (docs/scale-out.md).

A snapshot stores the records as an embedded catalog file whichever engine holds them:

- **capture**: the engine's checkpoint asks `storage.pgsnapshot.export_catalog` for one exported
  `REPEATABLE READ` snapshot of the store, copied table by table into a catalog file with the same
  schema (the numbered migrations every participant declares, applied by SQLite). Participants'
  checkpoint, summary and blob references then run on that file exactly as on an embedded copy;
- **restore into PostgreSQL**: the snapshot is restored as usual into the node's STORAGE_PATH
  (FORMAT, secrets, blobs, participant files, the RECOVERY marker), then its catalog is loaded into
  an empty, migrated database and removed from the path. A non-empty database is refused first,
  before anything is written (`RecordStoreNotEmpty`).

So restore, validation, point-in-time recovery and the drill read one snapshot format, and a
scaled deployment can be restored into an embedded one (for inspection) and the other way round.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anvil.backup import mode
from anvil.backup.restore import empty_folder
from anvil.storage import pgsnapshot
from anvil.storage.pg import is_url, redact_url
from anvil.storage.recovery import Participant, Replayer


def migrations(participants: list[Participant]) -> dict[str, list[str]]:
    """component -> numbered migrations: what `anvil admin migrate` applies (the Replayers own every table)."""
    out: dict[str, list[str]] = {}
    for p in participants:
        if isinstance(p, Replayer):
            out.update(p.migrations())
    return out


def is_records_url(catalog: str | Path) -> bool:
    return isinstance(catalog, str) and is_url(catalog)


def capture(url: str, dest: Path, participants: list[Participant]) -> str:
    """Write one consistent snapshot of the PostgreSQL store into the catalog file `dest`; returns the
    consistency method the manifest records (naming the exported snapshot)."""
    info = pgsnapshot.export_catalog(url, dest, migrations(participants))
    return pgsnapshot.method(info["snapshot"])


def restore_into_records(url: str, target: Path, participants: list[Participant],
                         run_restore: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`anvil restore ... --records URL --target DIR`: `run_restore` writes the snapshot into DIR (as
    for an embedded restore); its catalog then moves into the PostgreSQL store at `url`.

    The store must be migrated to this Anvil's schema and empty: checked before `run_restore`
    (nothing is written when it is not), and again inside the loading transaction."""
    target = Path(target).absolute()
    migs = migrations(participants)
    was_empty = not target.exists() or not any(target.iterdir())
    with tempfile.TemporaryDirectory(prefix="anvil-pg-restore-") as scratch:
        pgsnapshot.check_empty(url, migs, Path(scratch))
        res = run_restore()
        try:
            loaded = pgsnapshot.load_catalog(target / "catalog.db", url, migs, Path(scratch))
        except BaseException:
            if was_empty:
                # Nothing was there before: leave no half restore (the database was rolled back).
                empty_folder(target)
            raise
    # The records now live in PostgreSQL: a catalog.db left beside them would be a second truth.
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        (target / name).unlink(missing_ok=True)
    marker = mode.read_marker(target) or {}
    marker["records"] = redact_url(url)
    mode.write_marker(target, marker)
    res["records"] = redact_url(url)
    res["records_loaded"] = loaded
    return res
